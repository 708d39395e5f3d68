"""PCA projections: a statistics pass that sets P_in, P_out to top covariance eigenvectors.

LoGra's PCA initialisation keeps, per layer, the input directions with the most activation
energy (eigenvectors of E[x xᵀ]) and the output directions with the most gradient energy
(eigenvectors of E[g gᵀ]): the directions that carry the Kronecker-factored curvature, so a
small rank loses less of what influence depends on than a random projection.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from logix.capture.hooks import CaptureError, position_mask, shared_across_batch
from logix.capture.per_sample import (
    full_precision,
    layer_dims,
    output_grads,
    projected_inputs,
)
from logix.capture.projection import SideProjection, whole_side
from logix.capture.whitening import WHITENED_KIND, whitened_side
from logix.vocabulary import FISHERS



class CovarianceCollector:
    """Sums of x xᵀ [d_in, d_in] and g gᵀ [d_out, d_out] per module over every position.

    x carries the appended 1 of the bias; g is ∂(per-example loss)/∂y (the batch mean undone);
    padded positions (mask 0) are left out. Embedding inputs are one-hot, so only the token
    counts (the diagonal of E[x xᵀ]) are kept. x xᵀ is added once per forward pass, g gᵀ once
    per backward pass that reaches the module: with fisher="true" (`pca_fisher.py`) the several
    pseudo-gradient passes of one forward sum to E_{y~p}[g gᵀ].
    """

    def __init__(self, modules: list[tuple[str, nn.Module, bool]]):
        self.modules = modules  # (name, module, bias)
        self.xx: dict[str, torch.Tensor] = {}
        self.gg: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}  # [positions, examples] seen per module
        self.fisher = "empirical"  # which loss's gradients g are: see `begin`

    def begin(self, fisher: str) -> None:
        """Start (or continue) a statistics pass whose g are gradients of the user's loss
        ("empirical") or the true Fisher's pseudo-gradients ("true"); the two never mix."""
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {list(FISHERS)}, got {fisher!r}")
        if self.gg and fisher != self.fisher:
            raise CaptureError(f"this run's statistics pass already holds {self.fisher!r}-Fisher "
                               f"covariances; finish it with fisher={self.fisher!r} or start a new run")
        self.fisher = fisher

    def attach(self, scale: float, mask: torch.Tensor | None, attribution_only: bool = False,
               outputs: list[torch.Tensor] | None = None) -> list:
        """Hooks on every module for one block; `outputs` (a list) receives each watched output,
        for `torch.autograd.grad` (the true-Fisher pass)."""
        if self.fisher == "true" and outputs is None:
            raise CaptureError("inside run.fit_projections(fisher='true') use `with fit(data_id=ids): "
                               "fit.backward(model(x))`, not `with run(...)` and loss.backward()")
        return [m.register_forward_hook(partial(self._forward, name, bias, scale, mask, attribution_only, outputs))
                for name, m, bias in self.modules]

    def _forward(self, name, bias, scale, mask, attribution_only, outputs, module, inputs, output):
        if not torch.is_grad_enabled() or shared_across_batch(name, module, inputs[0]):
            return None
        replaced = False
        if not output.requires_grad:
            if not attribution_only:
                return None
            output = output.detach().requires_grad_(True)  # as in ModuleCapture: a leaf to reach
            replaced = True
        with torch.no_grad(), full_precision(inputs[0].device):
            x = inputs[0].detach()
            if isinstance(module, nn.Embedding):
                idx = x.reshape(x.shape[0], -1)
                w = position_mask(mask, module, name, idx.double())
                w = torch.ones(idx.shape, dtype=torch.float64, device=idx.device) if w is None else w
                counts = torch.zeros(module.num_embeddings, dtype=torch.float64, device=idx.device)
                counts.index_add_(0, idx.reshape(-1), w.reshape(-1))
                self._add(self.xx, name, counts)
                self._count(name, w.sum(), idx.shape[0])
            else:
                # The layer input per position, with the bias's 1: a side kept whole.
                d_in = layer_dims(module, bias)[0]
                x = projected_inputs(module, x, SideProjection(d_in, d_in, None), bias).double()
                w = position_mask(mask, module, name, x)
                xw = x if w is None else x * w.unsqueeze(-1)
                self._add(self.xx, name, torch.einsum("bti,btj->ij", xw, x))
                positions = x.shape[0] * x.shape[1] if w is None else w.sum()
                self._count(name, positions, x.shape[0])
        output.register_hook(partial(self._backward, name, module, scale, mask))
        if outputs is not None:
            outputs.append(output)
        return output if replaced else None

    def _backward(self, name, module, scale, mask, grad):
        with torch.no_grad(), full_precision(grad.device):
            g = output_grads(module, grad.detach()).double() * scale
            w = position_mask(mask, module, name, g)
            if w is not None:
                g = g * w.unsqueeze(-1)
            self._add(self.gg, name, torch.einsum("bti,btj->ij", g, g))

    def _count(self, name: str, positions, examples: int) -> None:
        seen = torch.tensor([float(positions), float(examples)], dtype=torch.float64)
        self._add(self.counts, name, seen)

    @staticmethod
    def _add(store: dict, name: str, value: torch.Tensor) -> None:
        value = value.cpu()
        store[name] = store[name] + value if name in store else value

    def sides(self, name: str, rank_in: int, rank_out: int, notes: list[str], kind: str = "pca",
              damping: float = 0.0, seed: int = 0) -> tuple[SideProjection, SideProjection]:
        """P_in, P_out of one module from its covariances: top eigenvectors as rows (pca), or a
        seeded Gaussian times the damped factor's inverse square root (kfac-whitened)."""
        if name not in self.gg:
            raise RuntimeError(
                f"the statistics pass saw no gradient for module {name!r}: run forward and "
                "backward on some training batches inside `with run.fit_projections():`"
            )
        if kind == WHITENED_KIND:  # K-FAC normalisation: A / N_pos, S / N_ex
            positions, examples = self.counts[name].clamp_min(1).tolist()
            return (whitened_side(self.xx[name] / positions, rank_in, damping, seed, name, "in", notes),
                    whitened_side(self.gg[name] / examples, rank_out, damping, seed, name, "out", notes))
        return (top_directions(self.xx[name], rank_in, name, "in", notes),
                top_directions(self.gg[name], rank_out, name, "out", notes))


def top_directions(cov: torch.Tensor, rank: int, name: str, side: str, notes: list[str]) -> SideProjection:
    """The `rank` leading eigenvectors of `cov` ([d, d], or its diagonal [d]) as a [rank, d]
    projection; a rank at or above d keeps the side whole."""
    d = cov.shape[0]
    whole = whole_side(name, side, d, rank, notes)
    if whole is not None:
        return whole
    if cov.ndim == 1:  # one-hot inputs: eigenvectors are the most frequent tokens' indicators
        top = torch.sort(cov, descending=True, stable=True).indices[:rank]
        return SideProjection(d, rank, F.one_hot(top, d).float())
    _, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    matrix = vectors[:, -rank:].flip(1).T.contiguous()  # descending eigenvalue order
    # A fixed sign per direction (largest entry positive) makes the result reproducible.
    signs = torch.sign(matrix.gather(1, matrix.abs().argmax(1, keepdim=True)))
    return SideProjection(d, rank, (matrix * signs).float())
