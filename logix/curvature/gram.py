"""The `raw` preconditioner of a block wider than the store is long (N < w): the Gram form.

With G [N, w] the block's stored rows and F = GᵀG / N, Woodbury's identity gives

    (F + λI)⁻¹ = (1/λ) (I − Gᵀ (NλI + K)⁻¹ G),        K = G Gᵀ  [N, N]

so nothing [w, w] is formed or eigendecomposed: one product K (N²w) and one Cholesky factor
L Lᵀ = NλI + K (N³/3). For the store's own rows there is no cancellation at all:

    (F + λI)⁻¹ g_i = N Gᵀ (NλI + K)⁻¹ e_i,  so  q (F + λI)⁻¹ Gᵀ = N (q Gᵀ)(NλI + K)⁻¹

(`row_scores`: a query batch scores as one [n, w] × [w, N] product and two triangular solves
of [N, n]). From the second batch on, the preconditioned rows X̃ = N (NλI + K)⁻¹ G [N, w]
(another N²w, float32, as large as G) are kept, so that a batch is one product q X̃ᵀ of the
plain scores' shapes, and xᵢᵀ(F + λI)⁻¹xᵢ = ⟨xᵢ, x̃ᵢ⟩. λ = damping · trace(F) / w (the mean
eigenvalue), or absolute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from logix.store.format import ModuleInfo


def gram_matrix(rows: torch.Tensor, products: torch.dtype) -> torch.Tensor:
    """K = G Gᵀ [N, N] float64 of rows G [N, w], the product in `products`."""
    g = rows.to(products)
    return (g @ g.T).to(torch.float64)


@dataclass
class GramBlock:
    """(F + λI)⁻¹ of one module from its N stored rows G, through the N×N Gram matrix."""

    module: ModuleInfo
    rows: torch.Tensor  # G [N, w] in `products` dtype (float32 rows are exact)
    factor: torch.Tensor  # L [N, N] float64, lower: L Lᵀ = NλI + G Gᵀ
    damping: float  # λ
    preconditioned: torch.Tensor | None = None  # X̃ = N (NλI + K)⁻¹ G [N, w] float32, once built

    @classmethod
    def build(
        cls,
        module: ModuleInfo,
        rows: torch.Tensor,
        damping: float,
        absolute: bool,
        products: torch.dtype = torch.float64,
        gram: torch.Tensor | None = None,
    ) -> GramBlock:
        """The block of `rows` [N, w] with damping relative to trace(F)/w unless `absolute`.

        The N²w products (K here, X̃ later) run in `products`, the [N, N] factor in float64:
        float32 products changed the digits store's scores by ~1e-5 relative
        (`benchmarks/bench_first_query.py`); float64 ones are exact (the tests). `gram`: K
        when the caller has it (a cache)."""
        g = rows.to(products)
        n, w = g.shape
        k = gram_matrix(g, products) if gram is None else gram.to(torch.float64)
        mean = float(torch.diagonal(k).sum()) / (n * w)  # trace(F) / w
        lam = float(damping) if absolute or not mean > 0 else float(damping) * mean
        shifted = k + (n * lam) * torch.eye(n, dtype=torch.float64, device=k.device)
        return cls(module, g, torch.linalg.cholesky(shifted), lam)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> GramBlock:
        """On `device`; G and L keep their dtypes whatever `dtype` (the general-row formulas
        subtract nearly equal terms, so they run in float64 and return the input's dtype)."""
        device = torch.device(device)
        if self.rows.device == device:
            return self
        return GramBlock(
            self.module,
            self.rows.to(device),
            self.factor.to(device),
            self.damping,
            None if self.preconditioned is None else self.preconditioned.to(device),
        )

    def _solve(self, b: torch.Tensor) -> torch.Tensor:
        """(NλI + K)⁻¹ b for b [N, k] (float64)."""
        return torch.cholesky_solve(b, self.factor)

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """q [n, w] -> q (F + λI)⁻¹ [n, w] = (q − (q Gᵀ)(NλI + K)⁻¹ G) / λ, in q's dtype."""
        v, g = q.to(torch.float64), self.rows.to(torch.float64)
        a = self._solve((v @ g.T).T).T  # [n, N]
        return ((v - a @ g) / self.damping).to(q.dtype)

    def quadratic(self, x: torch.Tensor) -> torch.Tensor:
        """xᵀ(F + λI)⁻¹x per row of any x [n, w]: (‖x‖² − ‖L⁻¹ G xᵀ‖²) / λ, clamped at 0."""
        v, g = x.to(torch.float64), self.rows.to(torch.float64)
        y = torch.linalg.solve_triangular(self.factor, g @ v.T, upper=False)  # [N, n]
        return ((v * v).sum(dim=1) - (y * y).sum(dim=0)).clamp(min=0).div(self.damping).to(x.dtype)

    def row_scores(self, q: torch.Tensor) -> torch.Tensor:
        """q (F + λI)⁻¹ Gᵀ = N (q Gᵀ)(NλI + K)⁻¹: the scores of q [n, w] against every stored
        row, [n, N] float32 (q Gᵀ in float64)."""
        a = q.to(torch.float64) @ self.rows.to(torch.float64).T
        return (self.rows.shape[0] * self._solve(a.T).T).to(torch.float32)

    def precondition_rows(self) -> None:
        """Build X̃ = N (NλI + K)⁻¹ G once (N²w in the products' dtype)."""
        if self.preconditioned is None:
            inverse = torch.cholesky_inverse(self.factor).to(self.rows.dtype)
            self.preconditioned = (self.rows.shape[0] * (inverse @ self.rows)).to(torch.float32)

    def train_rows(self, start: int, stop: int) -> torch.Tensor:
        """X̃ of the store's rows start..stop-1: [stop - start, w] float32 (built if needed)."""
        self.precondition_rows()
        return self.preconditioned[start:stop]
