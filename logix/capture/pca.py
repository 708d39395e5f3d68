"""PCA projections: a statistics pass that sets P_in, P_out to top covariance eigenvectors.

LoGra's PCA initialisation keeps, per layer, the input directions with the most activation
energy (eigenvectors of E[x xᵀ]) and the output directions with the most gradient energy
(eigenvectors of E[g gᵀ]): the directions that carry the Kronecker-factored curvature, so a
small rank loses less of what influence depends on than a random projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from logix.capture.hooks import CaptureBlock, ForwardCall, ModuleCapture, Sink, position_mask
from logix.capture.per_sample import (
    layer_dims,
    output_grads,
    projected_inputs,
)
from logix.capture.projection import SideProjection, whole_side
from logix.capture.whitening import WHITENED_KIND, whitened_side
from logix.errors import CaptureError
from logix.vocabulary import FISHERS


class CovarianceSink(Sink):
    """Sums of x xᵀ [d_in, d_in] and g gᵀ [d_out, d_out] per module over every position.

    x carries the appended 1 of the bias; g is ∂(per-example loss)/∂y (the batch mean undone);
    padded positions (mask 0) are left out. Embedding inputs are one-hot, so only the token
    counts (the diagonal of E[x xᵀ]) are kept. x xᵀ is added once per forward call, g gᵀ once
    per backward pass that reaches the module: with fisher="true" the several pseudo-gradient
    passes of one forward sum to E_{y~p}[g gᵀ] (`capture.fisher`). The sums stay after the pass.
    """

    projected = False  # the raw x and g: the projections do not exist yet

    def __init__(self) -> None:
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
            raise CaptureError(
                f"this run's statistics pass already holds {self.fisher!r}-Fisher "
                f"covariances; finish it with fisher={self.fisher!r} or start a new run"
            )
        self.fisher = fisher

    def forward(self, capture: ModuleCapture, block: CaptureBlock, x: torch.Tensor) -> None:
        module, name, mask = capture.module, capture.name, block.mask
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
            d_in = layer_dims(module, capture.bias)[0]
            x = projected_inputs(module, x, SideProjection(d_in, d_in, None), capture.bias).double()
            w = position_mask(mask, module, name, x)
            xw = x if w is None else x * w.unsqueeze(-1)
            self._add(self.xx, name, torch.einsum("bti,btj->ij", xw, x))
            self._count(name, x.shape[0] * x.shape[1] if w is None else w.sum(), x.shape[0])

    def backward(
        self,
        capture: ModuleCapture,
        block: CaptureBlock,
        call: ForwardCall,
        g_proj: torch.Tensor | None,
        grad: torch.Tensor,
    ) -> None:
        g = output_grads(capture.module, grad).double() * block.grad_scale
        w = position_mask(block.mask, capture.module, capture.name, g)
        if w is not None:
            g = g * w.unsqueeze(-1)
        self._add(self.gg, capture.name, torch.einsum("bti,btj->ij", g, g))

    def _count(self, name: str, positions, examples: int) -> None:
        seen = torch.tensor([float(positions), float(examples)], dtype=torch.float64)
        self._add(self.counts, name, seen)

    @staticmethod
    def _add(store: dict, name: str, value: torch.Tensor) -> None:
        value = value.cpu()
        store[name] = store[name] + value if name in store else value

    def sides(
        self,
        name: str,
        rank_in: int,
        rank_out: int,
        notes: list[str],
        kind: str = "pca",
        damping: float = 0.0,
        seed: int = 0,
    ) -> tuple[SideProjection, SideProjection]:
        """P_in, P_out of one module from its covariances: top eigenvectors as rows (pca), or a
        seeded Gaussian times the damped factor's inverse square root (kfac-whitened)."""
        if name not in self.gg:
            raise CaptureError(
                f"the statistics pass saw no gradient for module {name!r}: run forward and "
                "backward on some training batches inside `with run.fit_projections():`"
            )
        if kind == WHITENED_KIND:  # K-FAC normalisation: A / N_pos, S / N_ex
            positions, examples = self.counts[name].clamp_min(1).tolist()
            return (
                whitened_side(self.xx[name] / positions, rank_in, damping, seed, name, "in", notes),
                whitened_side(self.gg[name] / examples, rank_out, damping, seed, name, "out", notes),
            )
        return (
            top_directions(self.xx[name], rank_in, name, "in", notes),
            top_directions(self.gg[name], rank_out, name, "out", notes),
        )


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
