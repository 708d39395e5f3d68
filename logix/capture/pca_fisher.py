"""The true-Fisher statistics pass of PCA projections: `run.fit_projections(fisher="true")`.

    with run.fit_projections(fisher="true") as fit:
        for ids, x in batches:
            with fit(data_id=ids):            # mask=: the padding mask, as in `run(...)`
                fit.backward(model(x))        # label_mask=: target positions of [B, T, V] logits

The empirical pass sets P_out from the gradients g of the loss the user backpropagates. Here g
are the true Fisher's pseudo-gradients (`capture.fisher`: ℓ_c = √p_c (e_c − p) at the logits,
one backward pass per class slot and position), so the summed covariance is
Σ_n E_{y~p_n}[g gᵀ] = Σ_n J_nᵀ(diag p_n − p_n p_nᵀ)J_n with J_n = ∂z_n/∂y_n at the layer output:
the output factor of the Gauss–Newton matrix, the curvature `fit_curvature(fisher="true")`
preconditions with. The input side E[x xᵀ] is the empirical pass's, added once per forward.

Each pass is `torch.autograd.grad` to the watched layers' outputs only: parameters, their
`.grad` and `requires_grad` are never touched. Put a model with dropout in `eval()` mode first.
"""

from __future__ import annotations

from typing import Any

import torch

from logix.capture.fisher import backpropagate_to, check_pass_logits, fisher_logit_grads
from logix.capture.hooks import CaptureError, check_batch_mask


class _Block:
    """`with fit(data_id=ids, mask=...)`: the collector's hooks on one forward pass."""

    def __init__(self, fit: TrueFisherProjectionFit, batch_size: int, mask: torch.Tensor | None):
        self.fit = fit
        self.batch_size = batch_size
        self.mask = mask
        self.outputs: list[torch.Tensor] = []  # each watched module's output, for autograd.grad
        self.handles: list = []
        self.backwards = 0

    def __enter__(self) -> _Block:
        run = self.fit.run
        if run._active is not None:
            raise CaptureError("`with fit(...)` blocks cannot be nested or used inside `with run(...)`")
        # The scale is 1: the pseudo-gradients are already those of each example's own loss.
        self.handles = run._collector.attach(1.0, self.mask, attribution_only=True, outputs=self.outputs)
        run._active = self
        self.fit._block = self
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for h in self.handles:
            h.remove()
        self.fit.run._active = None
        self.fit._block = None
        if exc_type is None and self.backwards == 0:
            raise CaptureError("call fit.backward(logits) inside `with fit(data_id=...)`")
        return False


class TrueFisherProjectionFit:
    """`with run.fit_projections(fisher="true") as fit:`; see the module doc. On a clean exit the
    run's projections are derived and its store is created, as after the empirical pass."""

    def __init__(self, run: Any):
        self.run = run
        self.passes = 0  # backward passes so far (one per class slot and position per batch)
        self._block: _Block | None = None
        self._open = False

    def __enter__(self) -> TrueFisherProjectionFit:
        self.run._fitting = True
        self._open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.run._fitting = False
        self._open = False
        if exc_type is None:
            self.run._finish_fit()
        return False

    def __call__(self, data_id: Any, mask: torch.Tensor | None = None) -> _Block:
        """A context for one batch: one id per example (only counted: nothing is stored);
        `mask` [B, T] marks real (1) and padded (0) input positions as in `run(data_id=...)`."""
        if not self._open:
            raise CaptureError("use the pass as `with run.fit_projections(fisher='true') as fit:`")
        batch_size = 1 if isinstance(data_id, (int, str)) else len(data_id)
        if batch_size == 0:
            raise ValueError("data_id is empty: pass one id per example of the batch")
        check_batch_mask(mask, batch_size)
        return _Block(self, batch_size, mask)

    def backward(self, logits: torch.Tensor, label_mask: torch.Tensor | None = None) -> None:
        """Backpropagate the batch's Fisher pseudo-gradients from `logits` ([B, C] or [B, T, V],
        computed inside the block) into the output-gradient covariances.

        label_mask: [B] or [B, T] like `logits` without its last dimension; 1 at targets of the
        loss, 0 elsewhere, other values weight a position (see `fisher_logit_grads`)."""
        block = self._block
        if block is None:
            raise CaptureError("call fit.backward(logits) inside a `with fit(data_id=...)` block")
        check_pass_logits(logits, block.batch_size, block.outputs)
        for ell in fisher_logit_grads(logits, label_mask):
            reached = backpropagate_to(block.outputs, logits, ell)
            if all(g is None for g in reached):
                raise CaptureError("the backward pass reached no watched module")
            self.passes += 1
        block.backwards += 1
