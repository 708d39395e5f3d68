"""Block-diagonal preconditioners: map query rows Q [n, D] to Q' = Q (F + λI)⁻¹ per module.

- `identity`: F = 0 and no damping, so Q' = Q (plain gradient dot products, TracIn-style).
- `raw`: F_m = S_m / N from `covariance.py`, inverted through its eigendecomposition
  F_m = V diag(e) Vᵀ: (F_m + λ_m I)⁻¹ = V diag(1 / (e + λ_m)) Vᵀ; or, for a block wider than
  the store is long (N < w, chosen automatically), exactly through the N×N Gram matrix of its
  rows (`gram.py`), which also holds the train rows preconditioned.
- `kfac` / `ekfac`: F_m = (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ from the K-FAC factors (`kfac.py`),
  applied without ever forming a [w, w] matrix; Λ = e_S e_Aᵀ (kfac) or refitted to the rows (ekfac).

`fisher="empirical"` reads the statistics of the stored rows (the training labels);
`fisher="true"` reads the `.true` statistics of a `run.fit_curvature(fisher="true")` pass (labels
drawn from the model: the Gauss–Newton matrix), see `true_fisher.py`.

Damping is `λ_m = damping · mean eigenvalue of F_m`, or `λ_m = damping` when `absolute_damping=True`.
Mean eigenvalues: raw and ekfac trace(F_raw)/w (the same number), kfac mean(e_S)·mean(e_A).
Eigendecompositions are cached on disk (`eigen.py`): changing the damping costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logix.curvature.covariance import (
    MAX_RAW_WIDTH,
    ProgressFn,
    RawAccumulator,
    Statistics,
    saved_statistics,
    statistics_for,
)
from logix.curvature.eigen import eigendecompose
from logix.curvature.gram import GramBlock
from logix.curvature.kfac import (
    FACTOR_KIND,
    KroneckerBlock,
    ekfac_eigenvalues,
    factor_eigenbases,
    load_factors,
)
from logix.curvature.true_fisher import (
    true_ekfac_eigenvalues,
    true_factors,
    true_kind,
    true_raw_statistics,
)
from logix.store.format import ModuleInfo, StoreError, total_width
from logix.vocabulary import FISHERS, PRECONDITIONERS, RAW_FORMS, check_choice, renamed

# The statistics each preconditioner reads by default (variants like "kfac.true" plug in here).
DEFAULT_STATISTICS = {"raw": "raw", "kfac": FACTOR_KIND, "ekfac": FACTOR_KIND}


@dataclass
class Block:
    """The preconditioner of one module: eigenpairs of F_m and its damping λ_m."""

    module: ModuleInfo
    eigenvalues: torch.Tensor   # [w] float64, clamped at 0
    eigenvectors: torch.Tensor  # [w, w] float64, columns are eigenvectors
    damping: float              # λ_m

    def inverse_sqrt_factor(self) -> torch.Tensor:
        """W = V diag((e + λ)^-1/2), [w, w], so that W Wᵀ = (F + λI)⁻¹."""
        return self.eigenvectors * (self.eigenvalues + self.damping).rsqrt()

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Block:
        return Block(self.module, self.eigenvalues.to(device, dtype),
                     self.eigenvectors.to(device, dtype), self.damping)

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """q [n, w] -> q (F + λI)⁻¹ [n, w]."""
        return ((q @ self.eigenvectors) / (self.eigenvalues + self.damping)) @ self.eigenvectors.T

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """x W [n, w]: ‖x W‖² = xᵀ(F + λI)⁻¹x per row (W computed once per moved block)."""
        if not hasattr(self, "_w"):
            self._w = self.inverse_sqrt_factor()
        return x @ self._w


AnyBlock = Block | KroneckerBlock | GramBlock


@dataclass
class QuerySide:
    """A query batch ready to score against a store's rows (`Preconditioner.score`)."""

    dense: torch.Tensor               # [n, D]: multiplies the rows' columns (or a block's X̃)
    rows: dict[str, torch.Tensor]     # Gram blocks without X̃: their scores [n, N] outright

    def to(self, device: torch.device | str, dtype: torch.dtype) -> QuerySide:
        return QuerySide(self.dense.to(device, dtype),
                         {k: v.to(device, dtype) for k, v in self.rows.items()})


class Preconditioner:
    """Applies (F + λI)⁻¹ block by block to rows of width D.

    Only `selected` modules contribute: their blocks are preconditioned, every other column
    is zeroed, so scores against full train rows sum over the selected modules only.
    `blocks` is None for `identity`.
    """

    def __init__(self, kind: str, modules: list[ModuleInfo], selected: list[str],
                 blocks: dict[str, AnyBlock] | None, statistics: str | None = None) -> None:
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
        q = q.to(torch.float64)
        out = torch.zeros_like(q)
        blocks = self._blocks_on(q.device, q.dtype)
        for m in self.selected:
            block = q[:, m.columns]
            out[:, m.columns] = block if blocks is None else blocks[m.name].apply(block)
        return out

    def query_side(self, q: torch.Tensor, norms: bool = True) -> tuple[QuerySide, torch.Tensor]:
        """(the queries q [n, D] ready for `score`, qᵀ(F + λI)⁻¹q [n]): Q' in the plain blocks;
        in Gram blocks q itself once the preconditioned rows X̃ are kept (from the second batch
        on), else whole score rows N (q Gᵀ)(NλI + K)⁻¹ [n, N]. norms=False skips the Gram
        blocks' quadratic forms (zeros come back; only cosine scores use them). In q's dtype
        (the engine passes float64: float32 changed digits scores by up to 5e-6 relative,
        K-FAC's more, and costs a small share of a query)."""
        dense = torch.zeros_like(q)
        rows: dict[str, torch.Tensor] = {}
        quad = q.new_zeros(q.shape[0])
        blocks = self._blocks_on(q.device, q.dtype)
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
            else:
                dense[:, m.columns] = block if b is None else b.apply(block)
                quad += (block * dense[:, m.columns]).sum(dim=1)
        self._batches += 1
        return QuerySide(dense, rows), quad.clamp(min=0)

    @property
    def has_gram(self) -> bool:
        """Whether some selected block is in Gram form (its train side is preconditioned)."""
        return any(isinstance((self.blocks or {}).get(m.name), GramBlock) for m in self.selected)

    def score_module(self, side: QuerySide, x: torch.Tensor, module: ModuleInfo,
                     start: int) -> torch.Tensor:
        """Scores [n, c] of one module's block against the store's rows start.. (x [c, D])."""
        if module.name in side.rows:
            return side.rows[module.name][:, start:start + x.shape[0]].to(side.dense.dtype)
        b = (self.blocks or {}).get(module.name)
        if isinstance(b, GramBlock):
            b = self._blocks_on(x.device, x.dtype)[module.name]
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

    def quadratic(self, x: torch.Tensor, per_module: bool = False,
                  start: int | None = None) -> torch.Tensor:
        """xᵀ (F + λI)⁻¹ x for every row: [n] (or [n_modules, n] per selected module).

        Computed as the squared norm of the whitened block in x's floating dtype (float32 for
        train chunks), so it is never negative: one [n, w] × [w, w] product per module for raw,
        two rotations by the factor eigenbases for kfac / ekfac. Gram blocks: ⟨x, x̃⟩ for the
        store's own rows `start`.. once X̃ is kept (no cancellation), else the float64 Woodbury
        form.
        """
        blocks = self._blocks_on(x.device, x.dtype)
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

    def _blocks_on(self, device: torch.device, dtype: torch.dtype) -> dict[str, AnyBlock] | None:
        """The selected blocks on `device` in `dtype` (moved once, then kept)."""
        if self.blocks is None:
            return None
        key = (str(device), dtype)
        if key not in self._moved:
            self._moved[key] = {m.name: self.blocks[m.name].to(device, dtype) for m in self.selected}
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


def damping_value(eigenvalues: torch.Tensor, damping: float, absolute: bool) -> float:
    """λ = damping (absolute) or damping · mean eigenvalue; `damping` where F is zero."""
    if absolute:
        return float(damping)
    mean = float(eigenvalues.mean()) if eigenvalues.numel() else 0.0
    return float(damping) * mean if mean > 0 else float(damping)


def build_preconditioner(store: Any, kind: str = "raw", damping: float = 0.1, *,
                         absolute_damping: bool = False, modules: list[str] | None = None,
                         device: torch.device | str = "cpu", chunk_rows: int = 4096,
                         progress: ProgressFn | None = None, statistics: str | None = None,
                         fisher: str = "empirical", form: str = "auto",
                         absolute: bool | None = None) -> Preconditioner:
    """The preconditioner of `kind` for `store`'s segment, over `modules` (all if None).

    statistics: the statistics kind it reads (default `DEFAULT_STATISTICS[kind]`: `raw` for raw,
    `kfac` for kfac / ekfac, with `.true` appended for `fisher="true"`).
    fisher: "empirical" (statistics of the stored rows, recomputed if missing) or "true" (from a
    `run.fit_curvature(fisher="true")` pass; an error naming it if absent).
    form (raw only): "eigen" (eigendecompose F_m), "gram" (Woodbury through the N×N Gram
    matrix of the rows, `gram.py`, all in float64) or "auto": gram for the blocks wider than
    the store is long, its two N²w products in float32 (the [N, N] factor in float64).
    absolute: the old name of absolute_damping (warns once).
    """
    absolute = bool(renamed("absolute", "absolute_damping", absolute, absolute_damping,
                            "build_preconditioner"))
    check_choice(kind, PRECONDITIONERS, "preconditioner")
    check_choice(fisher, FISHERS, "fisher")
    check_choice(form, RAW_FORMS, "raw preconditioner form")
    true = fisher == "true"
    table = list(store.modules)
    selected = [m.name for m in table] if modules is None else list(modules)
    if kind == "identity":
        return Preconditioner(kind, table, selected, None)
    if not damping > 0:
        raise ValueError(f"damping must be > 0 for the {kind!r} preconditioner, got {damping}")
    statistics = statistics or (true_kind(DEFAULT_STATISTICS[kind]) if true else DEFAULT_STATISTICS[kind])
    directory = Path(store.curvature_dir)
    blocks: dict[str, AnyBlock] = {}
    if kind == "raw":
        if true and form == "gram":
            raise ValueError("form='gram' works from the stored rows (the empirical Fisher); the "
                             "true Fisher's statistics come from a model pass: use form='eigen'")
        n = len(store)
        widths = {m.name: m.width for m in table}
        # auto: Gram where N < w; above MAX_RAW_WIDTH only when asked (form="gram"): the
        # eigen path's guard then names the limit, as a [w, w] block would.
        gram = [] if true else [s for s in selected if form == "gram" or (
            form == "auto" and n < widths[s] <= MAX_RAW_WIDTH)]
        if gram:
            products = torch.float64 if form == "gram" else torch.float32
            blocks.update(gram_blocks(store, gram, damping, absolute, chunk_rows, progress, products))
        eigen = [s for s in selected if s not in gram]
        if eigen:
            stats = (true_raw_statistics(store) if true else
                     raw_statistics(store, statistics, eigen, full=not gram, chunk_rows=chunk_rows,
                                    progress=progress))
            if stats.rows == 0:
                raise StoreError("the curvature statistics cover no rows; the store segment is empty")
            try:  # the cache's folder (absent when no statistics were saved yet)
                directory.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass  # a read-only store: eigendecompose recomputes next time
            eig = eigendecompose(stats, eigen, directory / f"eigen-{statistics}.safetensors", device)
            for m in table:
                if m.name in eig:
                    e, v = eig[m.name]
                    blocks[m.name] = Block(m, e, v, damping_value(e, damping, absolute))
        return Preconditioner(kind, table, selected, blocks, statistics)
    stats = true_factors(store) if true else load_factors(store, statistics)
    bases = factor_eigenbases(stats, selected, directory / f"eigen-{statistics}.safetensors", device)
    if kind == "ekfac" and true:
        values = true_ekfac_eigenvalues(store, stats, bases, selected)
    elif kind == "ekfac":
        values = ekfac_eigenvalues(store, stats, bases, selected,
                                   chunk_rows=chunk_rows, device=device,
                                   progress=progress,
                                   cache_path=directory / f"e{statistics}-stream.safetensors")
    else:
        values = {n: b.kfac_eigenvalues() for n, b in bases.items()}
    for m in table:
        if m.name in bases:
            lam = values[m.name].clamp(min=0)
            blocks[m.name] = KroneckerBlock(m, bases[m.name].q_in, bases[m.name].q_out, lam,
                                            damping_value(lam.flatten(), damping, absolute))
    return Preconditioner(kind, table, selected, blocks, statistics)


def raw_statistics(store: Any, kind: str, names: list[str], *, full: bool, chunk_rows: int,
                   progress: ProgressFn | None) -> Statistics:
    """`raw` statistics covering at least the modules `names`: the saved ones, else (full) a
    recompute of every module that is kept for next time, else one pass over `names` only (the
    other blocks are in Gram form and need no [w, w] sums)."""
    if full or kind != "raw":
        return statistics_for(store, kind, chunk_rows=chunk_rows, progress=progress)
    saved = saved_statistics(store, kind)
    if saved is not None:
        return saved
    modules = [m for m in store.modules if m.name in set(names)]
    acc = RawAccumulator(modules)
    for _, rows in store.iter_chunks(rows=chunk_rows, dtype=torch.float32):
        acc.update(rows)
        if progress is not None:
            progress("curvature", acc.rows, len(store))
    return Statistics(kind, list(store.modules), acc.rows, dict(acc.tensors()), ["stream"])


def gram_blocks(store: Any, names: list[str], damping: float, absolute: bool, chunk_rows: int,
                progress: ProgressFn | None, products: torch.dtype) -> dict[str, GramBlock]:
    """The Gram-form blocks of modules `names`, from one read of their columns (float64)."""
    modules = [m for m in store.modules if m.name in set(names)]
    rows = {m.name: torch.empty(len(store), m.width, dtype=torch.float64) for m in modules}
    done = 0
    for _, x in store.iter_chunks(rows=chunk_rows, dtype=torch.float32):
        for m in modules:
            rows[m.name][done:done + x.shape[0]] = x[:, m.columns]
        done += x.shape[0]
        if progress is not None:
            progress("gram", done, len(store))
    return {m.name: GramBlock.build(m, rows[m.name], damping, absolute, products) for m in modules}
