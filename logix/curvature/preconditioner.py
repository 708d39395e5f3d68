"""The `Preconditioner`: (F + λI)⁻¹ applied block by block to rows of width D, and the scoring
of query batches against a store's rows (`query_side` + `score`).

Blocks: `Block` (eigendecomposition of F_m, here), `KroneckerBlock` (kfac / ekfac, `kfac.py`),
`GramBlock` (raw with N < w, `gram.py`); `precondition.py` builds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from logix.curvature.gram import GramBlock
from logix.curvature.kfac import KroneckerBlock
from logix.errors import ConfigError
from logix.store.format import ModuleInfo, total_width

# A block's explicit inverse is formed when it pays for itself within this many query batches
# of the same size (a repeat query is the engine's use; the eigenvectors' two products cost 2nw²,
# the inverse's one nw² after w³ to form it).
INVERSE_AMORTISED_CALLS = 8


@dataclass
class Block:
    """The preconditioner of one module: eigenpairs of F_m and its damping λ_m."""

    module: ModuleInfo
    eigenvalues: torch.Tensor  # [w] float64, clamped at 0
    eigenvectors: torch.Tensor  # [w, w] float64, columns are eigenvectors
    damping: float  # λ_m

    def inverse_sqrt_factor(self) -> torch.Tensor:
        """W = V diag((e + λ)^-1/2), [w, w], so that W Wᵀ = (F + λI)⁻¹."""
        return self.eigenvectors * (self.eigenvalues + self.damping).rsqrt()

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Block:
        return Block(
            self.module, self.eigenvalues.to(device, dtype), self.eigenvectors.to(device, dtype), self.damping
        )

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """q [n, w] -> q (F + λI)⁻¹ [n, w], in the block's dtype.

        One product by the inverse H = V diag(1/(e + λ)) Vᵀ [w, w] (formed once per moved
        block, w³ multiply-adds) when `uses_inverse(n)`, else two by the eigenvectors (2nw²):
        the choice depends on the shapes only, so equal calls give equal bits."""
        if self.uses_inverse(q.shape[0]):
            if not hasattr(self, "_inverse"):
                self._inverse = self.inverse()
            return q @ self._inverse
        return ((q @ self.eigenvectors) / (self.eigenvalues + self.damping)) @ self.eigenvectors.T

    def uses_inverse(self, n: int) -> bool:
        """Whether `apply` of n rows takes the precomputed inverse: when forming it costs at
        most what `INVERSE_AMORTISED_CALLS` calls of n rows save (nw² each), n · calls ≥ w."""
        return n * INVERSE_AMORTISED_CALLS >= self.eigenvalues.shape[0]

    def inverse(self) -> torch.Tensor:
        """(F + λI)⁻¹ = V diag(1/(e + λ)) Vᵀ [w, w]."""
        return (self.eigenvectors / (self.eigenvalues + self.damping)) @ self.eigenvectors.T

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """x W [n, w]: ‖x W‖² = xᵀ(F + λI)⁻¹x per row (W computed once per moved block)."""
        if not hasattr(self, "_w"):
            self._w = self.inverse_sqrt_factor()
        return x @ self._w


AnyBlock = Block | KroneckerBlock | GramBlock


@dataclass
class QuerySide:
    """A query batch ready to score against a store's rows (`Preconditioner.score`)."""

    dense: torch.Tensor  # [n, D]: multiplies the rows' columns (or a block's X̃)
    rows: dict[str, torch.Tensor]  # Gram blocks without X̃: their scores [n, N] outright

    def to(self, device: torch.device | str, dtype: torch.dtype) -> QuerySide:
        return QuerySide(self.dense.to(device, dtype), {k: v.to(device, dtype) for k, v in self.rows.items()})


class Preconditioner:
    """Applies (F + λI)⁻¹ block by block to rows of width D.

    Only `selected` modules contribute: their blocks are preconditioned, every other column
    is zeroed, so scores against full train rows sum over the selected modules only.
    `blocks` is None for `identity`.
    """

    def __init__(
        self,
        kind: str,
        modules: list[ModuleInfo],
        selected: list[str],
        blocks: dict[str, AnyBlock] | None,
        statistics: str | None = None,
    ) -> None:
        self.kind = kind
        self.statistics = statistics
        self.modules = list(modules)
        self.selected = [m for m in modules if m.name in set(selected)]
        self.blocks = blocks
        self.width = total_width(modules)
        self._moved: dict[Any, dict[str, AnyBlock]] = {}
        self._batches = 0  # query batches prepared by `query_side`

    @property
    def dampings(self) -> dict[str, float]:
        """λ_m per selected module (empty for identity)."""
        return {k: b.damping for k, b in (self.blocks or {}).items()}

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """Q' = Q (F + λI)⁻¹ per block: [n, D] -> [n, D] float64 (on q's device)."""
        out = self._dense(q, torch.float64)
        blocks = self.blocks_on(q.device, torch.float64)
        for m in self.selected:
            block = q[:, m.columns].to(torch.float64)
            out[:, m.columns] = block if blocks is None else blocks[m.name].apply(block)
        return out

    def spectral(self, q: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Q ↦ Q f(F + λI) per selected module: [n, D] -> [n, D] float64 on q's device, f applied
        to each block's damped eigenvalues e + λ [w] (f(e) = 1/e is `apply`); the other modules'
        columns are zero. Eigen-form blocks only (`raw` built with form="eigen")."""
        q = q.to(torch.float64)
        out = torch.zeros_like(q)
        blocks = self.blocks_on(q.device, q.dtype) or {}
        for m in self.selected:
            b = blocks.get(m.name)
            if not isinstance(b, Block):
                raise ConfigError(
                    f"module {m.name!r}: a function of F + λI needs its eigendecomposition, but the "
                    f"{self.kind!r} preconditioner holds it as {type(b).__name__}: use the 'raw' "
                    "preconditioner with form='eigen'"
                )
            v = b.eigenvectors
            out[:, m.columns] = ((q[:, m.columns] @ v) * fn(b.eigenvalues + b.damping)) @ v.T
        return out

    def query_side(self, q: torch.Tensor, norms: bool = True) -> tuple[QuerySide, torch.Tensor]:
        """(the queries q [n, D] ready for `score`, qᵀ(F + λI)⁻¹q [n] float64): Q' in the plain
        blocks; in Gram blocks q itself once the preconditioned rows X̃ are kept (from the second
        batch on), else whole score rows N (q Gᵀ)(NλI + K)⁻¹ [n, N]. norms=False skips the
        quadratic forms of Gram and identity blocks (zeros come back; only cosine scores use
        them). Q' is in q's dtype (the engine passes the rows as stored, float32): only the
        blocks a preconditioner multiplies are upcast, and their products run in float64
        (float32 products changed digits scores by up to 5e-6 relative, K-FAC's more); the
        columns that pass through unchanged are written as they are (with the identity
        preconditioner and every module selected, Q' is q itself)."""
        if q.dtype not in (torch.float32, torch.float64):
            q = q.to(torch.float32)  # half-precision rows: Q' is at least float32
        rows: dict[str, torch.Tensor] = {}
        quad = q.new_zeros(q.shape[0], dtype=torch.float64)
        blocks = self.blocks_on(q.device, torch.float64)
        if blocks is None and len(self.selected) == len(self.modules):
            if norms:
                quad = (q.to(torch.float64) ** 2).sum(dim=1)
            self._batches += 1
            return QuerySide(q, rows), quad
        dense = self._dense(q, q.dtype)
        for m in self.selected:
            block = q[:, m.columns]
            b = None if blocks is None else blocks[m.name]
            if isinstance(b, GramBlock):
                if self._batches > 0:  # a repeat batch: X̃ pays for itself from here on
                    b.precondition_rows()
                if b.preconditioned is not None:
                    dense[:, m.columns] = block
                else:
                    rows[m.name] = b.row_scores(block)
                if norms:
                    quad += b.quadratic(block)
            elif b is None:
                dense[:, m.columns] = block
                if norms:
                    quad += (block.to(torch.float64) ** 2).sum(dim=1)
            else:
                block = block.to(torch.float64)
                applied = b.apply(block)
                dense[:, m.columns] = applied
                quad += (block * applied).sum(dim=1)
        self._batches += 1
        return QuerySide(dense, rows), quad.clamp(min=0)

    def _dense(self, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An [n, D] output like q in `dtype`, zero in the columns of unselected modules only
        (the selected ones are written)."""
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        for run in _runs([m for m in self.modules if m not in self.selected]):
            out[:, run] = 0
        return out

    @property
    def has_gram(self) -> bool:
        """Whether some selected block is in Gram form (its train side is preconditioned)."""
        return any(isinstance((self.blocks or {}).get(m.name), GramBlock) for m in self.selected)

    def score_module(self, side: QuerySide, x: torch.Tensor, module: ModuleInfo, start: int) -> torch.Tensor:
        """Scores [n, c] of one module's block against the store's rows start.. (x [c, D])."""
        if module.name in side.rows:
            return side.rows[module.name][:, start : start + x.shape[0]].to(side.dense.dtype)
        b = (self.blocks or {}).get(module.name)
        if isinstance(b, GramBlock):
            b = self.blocks_on(x.device, x.dtype)[module.name]
            rows = b.train_rows(start, start + x.shape[0]).to(side.dense.dtype)
            return side.dense[:, module.columns] @ rows.T
        return side.dense[:, module.columns] @ x[:, module.columns].T

    def score(self, side: QuerySide, x: torch.Tensor, start: int) -> torch.Tensor:
        """Scores [n, c] of a `query_side` against the store's rows start.. (x [c, D]): one
        product over the plain columns (those of unselected modules are zero), plus one term
        per Gram block."""
        if not self.has_gram:
            return side.dense @ x.T
        gram = [m for m in self.selected if isinstance(self.blocks[m.name], GramBlock)]
        plain = [m for m in self.selected if m not in gram]
        s = side.dense.new_zeros(side.dense.shape[0], x.shape[0])
        for run in _runs(plain):
            s += side.dense[:, run] @ x[:, run].T
        for m in gram:
            s += self.score_module(side, x, m, start)
        return s

    def quadratic(self, x: torch.Tensor, per_module: bool = False, start: int | None = None) -> torch.Tensor:
        """xᵀ (F + λI)⁻¹ x for every row: [n] (or [n_modules, n] per selected module).

        Computed as the squared norm of the whitened block in x's floating dtype (float32 for
        train chunks), so it is never negative: one [n, w] × [w, w] product per module for raw,
        two rotations by the factor eigenbases for kfac / ekfac. Gram blocks: ⟨x, x̃⟩ for the
        store's own rows `start`.. once X̃ is kept (no cancellation), else the float64 Woodbury
        form.
        """
        blocks = self.blocks_on(x.device, x.dtype)
        parts = []
        for m in self.selected:
            block = x[:, m.columns]
            b = None if blocks is None else blocks[m.name]
            if isinstance(b, GramBlock) and start is not None and b.preconditioned is not None:
                parts.append((block * b.train_rows(start, start + x.shape[0])).sum(dim=1).clamp(min=0))
            elif isinstance(b, GramBlock):
                parts.append(b.quadratic(block))
            else:
                if b is not None:
                    block = b.whiten(block)
                parts.append((block * block).sum(dim=1))
        if not parts:
            parts = [x.new_zeros(x.shape[0])]
        stacked = torch.stack(parts)
        return stacked if per_module else stacked.sum(dim=0)

    def blocks_on(self, device: torch.device, dtype: torch.dtype) -> dict[str, AnyBlock] | None:
        """The selected blocks on `device` in `dtype` (moved once, then kept). A Gram block
        keeps its dtypes, so one copy per device serves every dtype (and its X̃ is built once)."""
        if self.blocks is None:
            return None
        key = (str(device), dtype)
        if key not in self._moved:
            on_device = [v for (d, _), v in self._moved.items() if d == str(device)]
            moved = {}
            for m in self.selected:
                b = self.blocks[m.name]
                moved[m.name] = (
                    on_device[0][m.name] if on_device and isinstance(b, GramBlock) else b.to(device, dtype)
                )
            self._moved[key] = moved
        return self._moved[key]


def _runs(modules: list[ModuleInfo]) -> list[slice]:
    """The columns of `modules` (in table order) as few contiguous slices."""
    runs: list[slice] = []
    for m in modules:
        if runs and runs[-1].stop == m.offset:
            runs[-1] = slice(runs[-1].start, m.offset + m.width)
        else:
            runs.append(m.columns)
    return runs
