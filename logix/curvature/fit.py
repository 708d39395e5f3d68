"""The true-Fisher statistics pass: `with run.fit_curvature(fisher="true") as fit:`.

    with run.fit_curvature(fisher="true", statistics=["raw", "kfac"]) as fit:
        for ids, x in batches:
            with fit(data_id=ids):               # mask=: the padding mask, as in `run(...)`
                fit.backward(model(x))           # label_mask=: target positions of [B, T, V] logits

Inside a block the run's own capture hooks watch one forward pass; `fit.backward(logits)` then
backpropagates, one pass per class slot (and position), the logit-gradients of
`capture.fisher.fisher_logit_grads` with `torch.autograd.grad` to the watched layers' outputs
only. Each pass yields pseudo-gradient rows G̃_{n,c} [B, D] with the same projections, bias and
mask conventions as logged rows; they are never stored, only summed per kind:

- `raw`: Σ vec(G̃) vec(G̃)ᵀ per module (blocks up to 8192 wide);
- `kfac`: the hooks' K-FAC factors, A = Σ x̃x̃ᵀ once per forward position and S = Σ g̃g̃ᵀ over
  every pseudo output-gradient;
- `ekfac`: Σ (Q_Sᵀ G̃ Q_A)² for the eigenbases of the `kfac.true` factors an earlier pass saved
  (so EK-FAC takes two passes: statistics=["kfac"], then statistics=["ekfac"]).

They are saved on exit as `curvature/<segment>/<kind>.true-rNNNNN.safetensors` (replacing this
rank's previous ones), with rows = the examples seen. The row scale is that of a per-example
loss summed over its target positions (the loop's `loss_reduction` does not apply: the pass
builds each example's logit-gradients itself).

Cost: K backward passes per batch for classification (K = C for mass 1), T·K for sequences,
each as costly as the batch's own backward without weight gradients: meant for small models or
for a subset of the training data. Parameters, their `.grad` and `requires_grad` are never
touched (`autograd.grad` to the layer outputs computes no weight gradient). Put the model in
`eval()` mode first if it has dropout: the pass takes one forward and many backward passes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from logix.capture.factors import KroneckerSums
from logix.capture.fisher import backpropagate_to, check_pass_logits, fisher_logit_grads
from logix.capture.hooks import CaptureError, StepState, check_batch_mask
from logix.curvature.covariance import (
    ACCUMULATORS,
    Statistics,
    load_statistics,
    save_statistics,
)
from logix.curvature.kfac import (
    factor_eigenbases,
    factor_path,
    retire_other_ranks,
    save_factors,
)
from logix.curvature.true_fisher import EigenvalueSums, bases_key, true_kind
from logix.comm import barrier
from logix.store.format import StoreError, curvature_dir
from logix.store.writer import batch_ids

KINDS = ("raw", "kfac", "ekfac")
RowsFn = Callable[[list, torch.Tensor], None]  # (data ids, pseudo-gradient rows [n, D])


class _Batch:
    """`with fit(data_id=ids, mask=...)`: the capture hooks of one forward pass."""

    def __init__(self, fit: TrueFisherFit, ids: list, mask: torch.Tensor | None):
        self.fit = fit
        self.ids = ids
        self.state = StepState(batch_size=len(ids), width=fit.width, grad_scale=1.0, mask=mask,
                               attribution_only=True, outputs=[], factors=fit.pending,
                               rows_wanted=fit.rows_wanted)
        self.handles: list = []
        self.backwards = 0
        self.passes = 0

    def __enter__(self) -> _Batch:
        fit = self.fit
        if fit.run._active is not None:
            raise CaptureError("`with fit(...)` blocks cannot be nested or used inside `with run(...)`")
        self.handles = [c.attach(self.state) for c in fit.run._captures]
        fit.run._active = self
        fit._batch = self
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for h in self.handles:
            h.remove()
        self.state.open = False
        fit = self.fit
        fit.run._active = None
        fit._batch = None
        try:
            if exc_type is None:
                if self.backwards == 0:
                    raise CaptureError("call fit.backward(logits) inside `with fit(data_id=...)`")
                fit._commit(self.ids)
        finally:
            if fit.pending is not None:
                fit.pending.reset()  # a failed block adds nothing to the factors
        return False


class TrueFisherFit:
    """One true-Fisher pass of a run over some batches; see the module doc. After the pass:
    `examples`, `pseudo_rows`, `passes`, `positions`, `dropped_mass` and the files in `paths`."""

    def __init__(self, run: Any, segment: str, *, statistics: tuple[str, ...] = ("raw",),
                 mass: float = 1.0, on_rows: RowsFn | None = None):
        if not 0.0 < float(mass) <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        kinds = list(dict.fromkeys(statistics))
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown true-Fisher statistics {kind!r}; choose from {list(KINDS)}")
        if "kfac" in kinds and "ekfac" in kinds:
            raise ValueError("'ekfac' needs the eigenbases of the K-FAC factors of an earlier pass: "
                             "run one pass with statistics=['kfac'], then one with ['ekfac'] (or "
                             "collect 'raw' with 'kfac': for blocks up to 8192 wide the EK-FAC "
                             "eigenvalues follow from raw exactly)")
        if not kinds and on_rows is None:
            raise ValueError("nothing to compute: give statistics (e.g. ['raw']) or on_rows")
        self.run = run
        self.segment = segment
        self.modules = list(run.modules)
        self.width = run.width
        self.mass = float(mass)
        self.on_rows = on_rows
        self.kinds = kinds
        self.accumulators: dict[str, Any] = {}
        if "raw" in kinds:
            self.accumulators["raw"] = ACCUMULATORS["raw"](self.modules)
        self._bases: dict[str, str] = {}
        if "ekfac" in kinds:
            self.accumulators["ekfac"] = self._eigenvalue_sums()
        self.factors = KroneckerSums(run._factors.dims) if "kfac" in kinds else None
        self.pending = KroneckerSums(run._factors.dims, dtype=torch.float32) if "kfac" in kinds else None
        self.rows_wanted = bool(self.accumulators) or on_rows is not None
        self.examples = 0
        self.pseudo_rows = 0
        self.passes = 0
        self.positions = 0
        self.dropped_mass_sum = 0.0
        self.paths: list[Path] = []
        self._ids: set = set()
        self._batch: _Batch | None = None
        self._open = False

    def _eigenvalue_sums(self) -> EigenvalueSums:
        directory = curvature_dir(self.run.run_dir, self.segment)
        factors = load_statistics(directory, true_kind("kfac"))
        if factors is None or factors.modules != self.modules:
            raise StoreError(
                f"statistics=['ekfac'] needs the true-Fisher K-FAC factors of segment "
                f"{self.segment!r} first (no matching kfac.true-r*.safetensors in {directory}): run "
                "a pass with run.fit_curvature(fisher='true', statistics=['kfac']) before this one")
        names = [m.name for m in self.modules]
        bases = factor_eigenbases(factors, names, directory / f"eigen-{true_kind('kfac')}.safetensors")
        self._bases = {n: bases_key(factors, n) for n in names}
        return EigenvalueSums(self.modules, bases)

    @property
    def dropped_mass(self) -> float:
        """The mean probability mass left out per target position (0 for mass = 1)."""
        return self.dropped_mass_sum / max(self.positions, 1)

    def __enter__(self) -> TrueFisherFit:
        self._open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._open = False
        if exc_type is None:
            self.save()
        return False

    def __call__(self, data_id: Any, mask: torch.Tensor | None = None) -> _Batch:
        """A context for one batch: one id per example; `mask` [B, T] marks real (1) and
        padded (0) input positions, exactly as in `with run(data_id=..., mask=...)`."""
        if not self._open:
            raise CaptureError("use the pass as `with run.fit_curvature(fisher='true') as fit:`")
        ids = batch_ids(data_id)
        check_batch_mask(mask, len(ids))
        return _Batch(self, ids, mask)

    def backward(self, logits: torch.Tensor, label_mask: torch.Tensor | None = None) -> None:
        """Backpropagate the batch's Fisher pseudo-gradients from `logits` ([B, C] or
        [B, T, V], computed inside the block) and add them to the statistics.

        label_mask: [B] or [B, T] like `logits` without its last dimension; 1 at targets of the
        loss, 0 elsewhere, other values weight a position (see `fisher_logit_grads`)."""
        batch = self._batch
        if batch is None:
            raise CaptureError("call fit.backward(logits) inside a `with fit(data_id=...)` block")
        state = batch.state
        check_pass_logits(logits, state.batch_size, state.outputs)
        grads = fisher_logit_grads(logits, label_mask, self.mass)
        if self.rows_wanted and (state.destination is None or state.destination.device != logits.device):
            state.destination = torch.empty(state.batch_size, self.width, device=logits.device)
        for ell in grads:
            active = ell.detach().flatten(1).abs().amax(dim=1) > 0
            state.rows, state.written = None, set()
            state.factor_inputs = batch.passes == 0  # A once per forward position
            backpropagate_to(state.outputs, logits, ell)
            if not state.written:
                raise CaptureError("the backward pass reached no watched module")
            self.passes += 1
            batch.passes += 1
            if self.rows_wanted:
                rows = state.rows
                for i, m in enumerate(self.modules):
                    if i not in state.written:  # a module this pass never reached: zero gradient
                        rows[:, m.columns].zero_()
                self._add([batch.ids[i] for i in active.nonzero().flatten().tolist()], rows[active])
        self.positions += grads.positions
        self.dropped_mass_sum += float(grads.dropped_mass.sum())
        batch.backwards += 1

    def _add(self, ids: list, rows: torch.Tensor) -> None:
        if not bool(torch.isfinite(rows).all()):
            raise CaptureError("non-finite pseudo-gradients (NaN/inf): check the model's logits")
        cpu = rows.cpu()
        for acc in self.accumulators.values():
            acc.update(cpu)
        if self.on_rows is not None:
            self.on_rows(ids, rows)
        self.pseudo_rows += rows.shape[0]

    def _commit(self, ids: list) -> None:
        dups = [i for i in ids if i in self._ids]
        if dups:
            raise CaptureError(f"data id(s) {dups[:10]} were already seen in this pass: each "
                               "example must enter the Fisher once")
        if self.pending is not None:
            self.pending.commit(self.factors, len(ids))
        self._ids.update(ids)
        self.examples += len(ids)

    def statistics(self, kind: str = "raw") -> Statistics:
        """The summed true-Fisher statistics of `kind` so far, over `examples` rows."""
        if kind == "kfac":
            return Statistics(true_kind(kind), self.modules, self.examples, self.factors.tensors(),
                              positions=self.factors.position_counts())
        return Statistics(true_kind(kind), self.modules, self.examples,
                          dict(self.accumulators[kind].tensors()))

    def save(self) -> list[Path]:
        """Write `curvature/<segment>/<kind>.true-r<rank>.safetensors` for every kind (replacing
        this rank's previous pass); returns the paths."""
        if self.examples == 0:
            raise CaptureError("the curvature pass saw no batch: inside `with run.fit_curvature("
                               "fisher='true') as fit:` run `with fit(data_id=ids): fit.backward(model(x))`")
        rank = self.run.rank
        extra = {"segment": self.segment, "rank": str(rank), "fisher": "true",
                 "mass": repr(self.mass), "pseudo_rows": str(self.pseudo_rows),
                 "positions_seen": str(self.positions), "dropped_mass": repr(self.dropped_mass)}
        self.paths = []
        for kind in self.kinds:
            path = factor_path(self.run.run_dir, self.segment, rank, true_kind(kind))
            stats = self.statistics(kind)
            if kind == "kfac":
                self.paths.append(save_factors(path, self.modules, stats.tensors, stats.positions,
                                               stats.rows, kind=stats.kind, extra=extra))
            else:
                more = {"bases": json.dumps(self._bases)} if kind == "ekfac" else {}
                self.paths.append(save_statistics(path, stats, {**extra, **more}))
        # Every rank has written before any reads (the ekfac pass reads all kfac.true files)
        # or a stale file of a rank beyond this pass is deleted.
        barrier()
        if rank == 0:
            for kind in self.kinds:
                retire_other_ranks(self.run.run_dir, self.segment, true_kind(kind),
                                   self.run.world_size)
        return self.paths
