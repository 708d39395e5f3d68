"""Whitened projections from Kronecker factors the user supplies (Shampoo/SOAP-style `L`, `R`).

A Kronecker-factored optimizer keeps, per weight matrix ∇W [d_out, d_in], a left factor
L ≈ Σ ∇W ∇Wᵀ [d_out, d_out] and a right factor R ≈ Σ ∇Wᵀ ∇W [d_in, d_in]. Read as the curvature
L ⊗ R, they whiten each side exactly as the fitted K-FAC factors of `projection.kind:
kfac-whitened` do (`logix.capture.whitening`), with no statistics pass:

    P_out = G_out (L + λ_L I)^{-p}  [r_out, d_out],    P_in = G_in (R + λ_R I)^{-p}  [r_in, d_in]

λ = damping · mean eigenvalue of the factor, G the seeded Gaussians of the config's seed.
p = 1/2 (default) makes row dot products approximate ⟨g, (L ⊗ R)^{-1} g'⟩; Shampoo's own step
L^{-1/4} ∇W R^{-1/4} is the preconditioner (L ⊗ R)^{-1/4}, i.e. p = 1/8. Both factors are in
logix's row convention: the input side of a layer with a bias has d_in + 1 columns, the bias's
1 last, so R is [d_in + 1, d_in + 1] (a factor kept for the weight alone must be extended by the
caller, e.g. block-diagonally with the bias's own second moment). A factor may be the diagonal
[d] of a diagonal preconditioner (e.g. an embedding's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from logix.capture.projection import ModuleProjection
from logix.capture.whitening import whitened_side
from logix.errors import CaptureError


@dataclass(frozen=True)
class KroneckerFactors:
    """One module's supplied factors: left [d_out, d_out] (or [d_out]), right [d_in, d_in] (or
    [d_in]), d_in counting the bias column."""

    left: torch.Tensor
    right: torch.Tensor


def kronecker_projections(
    dims: Mapping[str, tuple[int, int]],
    factors: Mapping[str, KroneckerFactors],
    rank_in: int,
    rank_out: int,
    damping: float,
    seed: int,
    notes: list[str],
    power: float = 0.5,
) -> dict[str, ModuleProjection]:
    """Each module's (P_in, P_out) whitened by its supplied factors; dims: name -> (d_in, d_out)
    of the logged rows. Every watched module needs factors, and none may be extra."""
    missing = sorted(set(dims) - set(factors))
    extra = sorted(set(factors) - set(dims))
    if missing or extra:
        raise CaptureError(
            f"Kronecker factors must cover exactly the watched modules: missing {missing}, "
            f"not watched {extra}; pass one KroneckerFactors(left, right) per module of run.modules"
        )
    out = {}
    for name, (d_in, d_out) in dims.items():
        f = factors[name]
        check_factor(f.left, d_out, name, "left", "d_out")
        check_factor(f.right, d_in, name, "right", "d_in (with the bias column last, if any)")
        out[name] = ModuleProjection(
            whitened_side(f.right, rank_in, damping, seed, name, "in", notes, power),
            whitened_side(f.left, rank_out, damping, seed, name, "out", notes, power),
        )
    return out


def check_factor(factor: torch.Tensor, dim: int, name: str, side: str, what: str) -> None:
    """A CaptureError naming the expected shape unless `factor` is [dim, dim] or [dim] and finite."""
    shape = tuple(factor.shape)
    if shape not in ((dim, dim), (dim,)):
        raise CaptureError(
            f"{name}: the {side} Kronecker factor has shape {shape}, expected ({dim}, {dim}) or "
            f"({dim},): {what} of the logged rows"
        )
    if not bool(torch.isfinite(factor).all()):
        raise CaptureError(f"{name}: the {side} Kronecker factor has non-finite entries")
