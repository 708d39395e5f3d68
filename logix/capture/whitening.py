"""Whitened projections (`projection.kind: kfac-whitened`): project after whitening, not before.

Per module and side, with C the side's K-FAC factor from the statistics pass (A = E_pos[x xᵀ]
on the input side, S = Σ_t g gᵀ per example on the output side, normalised as in
`logix.curvature.kfac`) and λ = damping · mean eigenvalue of C (each factor damped on its own):

    P_in = G_in (A + λ_A I)^{-1/2}  [r_in, d_in],    P_out = G_out (S + λ_S I)^{-1/2}  [r_out, d_out]

G a seeded Gaussian scaled by 1/√r (the `random` kind's). The projected gradient is then
P_out ∇W P_inᵀ = G_out W̃ G_inᵀ with W̃ = (S+λ_S)^{-1/2} ∇W (A+λ_A)^{-1/2} the K-FAC-whitened
gradient, so plain dot products of rows approximate K-FAC influence up to the Johnson–
Lindenstrauss error of G. That error, relative to ‖Ã‖‖B̃‖, depends on the rank of the gradients
(`benchmarks/jl_error.py`, [256, 65] blocks, r = r_in = r_out): rms 0.17 / 0.135 at r = 32 / 64
for one position (rank one), 0.067 / 0.048 for rank 8, 0.039 / 0.028 for full rank (≈ 1/r). A
side whose rank reaches its dimension keeps the whitening matrix itself (no Gaussian): with
both sides whole, `identity` scores are K-FAC influence exactly (each factor damped alone).
Why: a random projection of the raw gradient keeps the high-variance directions that many
examples share and loses the rare ones that tell examples apart; no preconditioner applied
after the projection brings them back.
"""

from __future__ import annotations

import torch

from logix.capture.projection import SideProjection, gaussian_matrix
from logix.errors import CaptureError

WHITENED_KIND = "kfac-whitened"


def inverse_sqrt(cov: torch.Tensor, damping: float) -> torch.Tensor:
    """(C + λI)^{-1/2} with λ = damping · mean eigenvalue of C; cov [d, d] (or its diagonal [d],
    then the result is the diagonal [d]). float64; negative eigenvalues (rounding) count as 0."""
    return inverse_power(cov, damping, 0.5)


def inverse_power(cov: torch.Tensor, damping: float, power: float) -> torch.Tensor:
    """(C + λI)^{-power}, λ as in `inverse_sqrt`; power 1/2 whitens by C read as a Fisher
    factor, other powers serve optimizer factors (Shampoo applies L^{-1/4}: whitening 1/8)."""
    if not damping > 0:
        raise CaptureError(f"projection.damping must be > 0 for kind {WHITENED_KIND!r}, got {damping}")
    if not power > 0:
        raise CaptureError(f"the whitening power must be > 0, got {power}")
    cov = cov.double()
    tiny = torch.finfo(torch.float64).tiny
    if cov.ndim == 1:
        lam = damping * float(cov.clamp_min(0).mean())
        return (cov.clamp_min(0) + lam).clamp_min(tiny).pow(-power)
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    values = values.clamp_min(0)
    lam = damping * float(values.mean())
    scale = (values + lam).clamp_min(tiny).pow(-power)
    return (vectors * scale) @ vectors.T


def whitened_side(
    cov: torch.Tensor,
    rank: int,
    damping: float,
    seed: int,
    name: str,
    side: str,
    notes: list[str],
    power: float = 0.5,
) -> SideProjection:
    """One side G (C + λI)^{-power} [rank, d] float32 of module `name`; cov: the normalised
    factor [d, d] (or its diagonal [d] for one-hot inputs). A rank at or above d keeps the
    whitening matrix [d, d] alone (r = d), noted."""
    d = cov.shape[0]
    white = inverse_power(cov, damping, power)
    if rank >= d:
        notes.append(
            f"{name}: rank_{side} {rank} >= d_{side} {d}, side whitened without projection (r_{side} = {d})"
        )
        matrix = torch.diag(white) if white.ndim == 1 else white
        return SideProjection(d, d, matrix.float().contiguous())
    g = gaussian_matrix(seed, name, side, rank, d).double()
    matrix = g * white[None, :] if white.ndim == 1 else g @ white
    return SideProjection(d, rank, matrix.float().contiguous())
