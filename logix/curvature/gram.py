"""The `raw` preconditioner of a block wider than the store is long (N < w): the Gram form.

With G [N, w] the block's stored rows and F = GᵀG / N, Woodbury's identity gives

    (F + λI)⁻¹ = (1/λ) (I − Gᵀ (NλI + K)⁻¹ G),        K = G Gᵀ  [N, N]

so nothing [w, w] is formed or eigendecomposed: one product K (N²w), one Cholesky factor
L Lᵀ = NλI + K (N³/3), and per query batch two [n, N] × [N, w]-sized products.
The train rows need no per-query work at all: for a row g_i of G,

    (F + λI)⁻¹ g_i = N Gᵀ (NλI + K)⁻¹ e_i,   i.e.   X̃ = N (NλI + K)⁻¹ G   [N, w]

holds every train row preconditioned (computed once, float64, kept float32, as large as G),
so a query batch scores as q X̃ᵀ, the plain product's shapes, and xᵢᵀ(F + λI)⁻¹xᵢ = ⟨xᵢ, x̃ᵢ⟩
with no cancellation. λ = damping · trace(F) / w (the mean eigenvalue), or absolute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from logix.store.format import ModuleInfo


@dataclass
class GramBlock:
    """(F + λI)⁻¹ of one module from its N stored rows G, through the N×N Gram matrix."""

    module: ModuleInfo
    rows: torch.Tensor      # G [N, w] float64
    factor: torch.Tensor    # L [N, N] float64, lower: L Lᵀ = NλI + G Gᵀ
    damping: float          # λ
    preconditioned: torch.Tensor | None = None  # X̃ = N (NλI + K)⁻¹ G [N, w] float32

    @classmethod
    def build(cls, module: ModuleInfo, rows: torch.Tensor, damping: float, absolute: bool,
              products: torch.dtype = torch.float64) -> GramBlock:
        """The block of `rows` [N, w] with damping relative to trace(F)/w unless `absolute`.

        The two large products (K = G Gᵀ and X̃ = N (NλI + K)⁻¹ G, N²w multiply-adds each) run
        in `products`; the factor and inverse of the [N, N] matrix always in float64. float32
        products changed the digits store's scores by ~1e-5 relative (`benchmarks/
        bench_first_query.py`), float64 ones are exact (the tests)."""
        g = rows.to(torch.float64)
        n, w = g.shape
        low = rows.to(products)
        k = (low @ low.T).to(torch.float64)
        mean = float(torch.diagonal(k).sum()) / (n * w)  # trace(F) / w
        lam = float(damping) if absolute or not mean > 0 else float(damping) * mean
        shifted = k + (n * lam) * torch.eye(n, dtype=torch.float64, device=k.device)
        factor = torch.linalg.cholesky(shifted)
        inverse = torch.cholesky_inverse(factor)  # (NλI + K)⁻¹, [N, N]
        x_tilde = n * (inverse.to(products) @ low)
        return cls(module, g, factor, lam, x_tilde.to(torch.float32))

    @property
    def n_rows(self) -> int:
        return self.rows.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> GramBlock:
        """On `device`; G and L stay float64 whatever `dtype` (the general-row formulas
        subtract nearly equal terms), results come back in the input's dtype."""
        device = torch.device(device)
        if self.rows.device == device:
            return self
        return GramBlock(self.module, self.rows.to(device), self.factor.to(device), self.damping,
                         None if self.preconditioned is None else self.preconditioned.to(device))

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """q [n, w] -> q (F + λI)⁻¹ [n, w] = (q − (q Gᵀ)(NλI + K)⁻¹ G) / λ, in q's dtype."""
        v = q.to(torch.float64)
        a = torch.cholesky_solve((v @ self.rows.T).T, self.factor).T  # [n, N]
        return ((v - a @ self.rows) / self.damping).to(q.dtype)

    def quadratic(self, x: torch.Tensor) -> torch.Tensor:
        """xᵀ(F + λI)⁻¹x per row of any x [n, w]: (‖x‖² − ‖L⁻¹ G xᵀ‖²) / λ, clamped at 0."""
        v = x.to(torch.float64)
        y = torch.linalg.solve_triangular(self.factor, self.rows @ v.T, upper=False)  # [N, n]
        return ((v * v).sum(dim=1) - (y * y).sum(dim=0)).clamp(min=0).div(self.damping).to(x.dtype)

    def train_rows(self, start: int, stop: int) -> torch.Tensor:
        """X̃ of the store's rows start..stop-1: [stop - start, w] float32."""
        return self.preconditioned[start:stop]
