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
Eigendecompositions are cached on disk (`eigen.py`), Gram matrices too (`gram_blocks`):
changing the damping costs nothing, resp. one Cholesky factor of [N, N].
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from logix.curvature.covariance import (
    MAX_RAW_WIDTH,
    ProgressFn,
    RawAccumulator,
    saved_statistics,
    statistics_for,
)
from logix.curvature.eigen import eigendecompose
from logix.curvature.gram import GramBlock, gram_matrix
from logix.curvature.kfac import (
    FACTOR_KIND,
    KroneckerBlock,
    ekfac_eigenvalues,
    factor_eigenbases,
    load_factors,
)
from logix.curvature.preconditioner import AnyBlock, Block, Preconditioner
from logix.curvature.statistics import Statistics
from logix.curvature.true_fisher import (
    true_ekfac_eigenvalues,
    true_factors,
    true_kind,
    true_raw_statistics,
)
from logix.errors import StoreError
from logix.store.cache import cache_keys, load_cache, save_cache
from logix.vocabulary import FISHERS, PRECONDITIONERS, RAW_FORMS, check_choice

# The statistics each preconditioner reads by default (variants like "kfac.true" plug in here).
DEFAULT_STATISTICS = {"raw": "raw", "kfac": FACTOR_KIND, "ekfac": FACTOR_KIND}
GRAM_FORMAT = "logix-gram"


def damping_value(eigenvalues: torch.Tensor, damping: float, absolute: bool) -> float:
    """λ = damping (absolute) or damping · mean eigenvalue; `damping` where F is zero."""
    if absolute:
        return float(damping)
    mean = float(eigenvalues.mean()) if eigenvalues.numel() else 0.0
    return float(damping) * mean if mean > 0 else float(damping)


def build_preconditioner(
    store: Any,
    kind: str = "raw",
    damping: float = 0.1,
    *,
    absolute_damping: bool = False,
    modules: list[str] | None = None,
    device: torch.device | str = "cpu",
    chunk_rows: int = 4096,
    progress: ProgressFn | None = None,
    statistics: str | None = None,
    fisher: str = "empirical",
    form: str = "auto",
) -> Preconditioner:
    """The preconditioner of `kind` for `store`'s segment, over `modules` (all if None).

    statistics: the statistics kind it reads (default `DEFAULT_STATISTICS[kind]`: `raw` for raw,
    `kfac` for kfac / ekfac, with `.true` appended for `fisher="true"`).
    fisher: "empirical" (statistics of the stored rows, recomputed if missing) or "true" (from a
    `run.fit_curvature(fisher="true")` pass; an error naming it if absent).
    form (raw only): "eigen" (eigendecompose F_m), "gram" (Woodbury through the N×N Gram
    matrix of the rows, `gram.py`, all in float64) or "auto": gram for the blocks wider than
    the store is long, its two N²w products in float32 (the [N, N] factor in float64).
    """
    absolute = bool(absolute_damping)
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
            raise ValueError(
                "form='gram' works from the stored rows (the empirical Fisher); the "
                "true Fisher's statistics come from a model pass: use form='eigen'"
            )
        n = len(store)
        widths = {m.name: m.width for m in table}
        # auto: Gram where N < w; above MAX_RAW_WIDTH only when asked (form="gram"): the
        # eigen path's guard then names the limit, as a [w, w] block would.
        gram = (
            []
            if true
            else [
                s for s in selected if form == "gram" or (form == "auto" and n < widths[s] <= MAX_RAW_WIDTH)
            ]
        )
        if gram:
            products = torch.float64 if form == "gram" else torch.float32
            blocks.update(gram_blocks(store, gram, damping, absolute, chunk_rows, progress, products))
        eigen = [s for s in selected if s not in gram]
        if eigen:
            stats = (
                true_raw_statistics(store)
                if true
                else raw_statistics(
                    store, statistics, eigen, full=not gram, chunk_rows=chunk_rows, progress=progress
                )
            )
            if stats.rows == 0:
                raise StoreError("the curvature statistics cover no rows; the store segment is empty")
            eig = eigendecompose(
                stats,
                eigen,
                directory / f"eigen-{statistics}.safetensors",
                device,
                matrix=_reporting(stats.fisher, len(eigen), progress),
            )
            if progress is not None:
                progress("eigen", len(eigen), len(eigen))
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
        values = ekfac_eigenvalues(
            store,
            stats,
            bases,
            selected,
            chunk_rows=chunk_rows,
            device=device,
            progress=progress,
            cache_path=directory / f"e{statistics}-stream.safetensors",
        )
    else:
        values = {n: b.kfac_eigenvalues() for n, b in bases.items()}
    for m in table:
        if m.name in bases:
            lam = values[m.name].clamp(min=0)
            blocks[m.name] = KroneckerBlock(
                m,
                bases[m.name].q_in,
                bases[m.name].q_out,
                lam,
                damping_value(lam.flatten(), damping, absolute),
            )
    return Preconditioner(kind, table, selected, blocks, statistics)


def _reporting(matrix: Any, total: int, progress: ProgressFn | None) -> Any:
    """`matrix` (name -> [w, w]) that reports ("eigen", blocks started before, total) as each
    uncached block's eigendecomposition begins (seconds to minutes each for w in the thousands)."""
    started = [0]

    def fetch(name: str) -> torch.Tensor:
        if progress is not None:
            progress("eigen", started[0], total)
        started[0] += 1
        return matrix(name)

    return fetch


def raw_statistics(
    store: Any, kind: str, names: list[str], *, full: bool, chunk_rows: int, progress: ProgressFn | None
) -> Statistics:
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


def gram_blocks(
    store: Any,
    names: list[str],
    damping: float,
    absolute: bool,
    chunk_rows: int,
    progress: ProgressFn | None,
    products: torch.dtype,
) -> dict[str, GramBlock]:
    """The Gram-form blocks of modules `names`, from one read of their columns. K = G Gᵀ is
    cached (`gram-raw.safetensors`, keyed by a digest of each block's rows and the products'
    dtype), so another damping or engine on the same store costs one Cholesky factor."""
    modules = [m for m in store.modules if m.name in set(names)]
    rows = {m.name: torch.empty(len(store), m.width, dtype=torch.float32) for m in modules}
    done = 0
    for _, x in store.iter_chunks(rows=chunk_rows, dtype=torch.float32):
        for m in modules:
            rows[m.name][done : done + x.shape[0]] = x[:, m.columns]
        done += x.shape[0]
        if progress is not None:
            progress("gram", done, len(store))
    path = Path(store.curvature_dir) / "gram-raw.safetensors"
    cached = load_cache(path, GRAM_FORMAT)
    tensors, keys = ({}, {}) if cached is None else (dict(cached[0]), cache_keys(cached[1]))
    changed = False
    blocks = {}
    for m in modules:
        digest = _rows_digest(rows[m.name], products)
        kept = tensors.get(m.name)
        shape = (len(store), len(store))
        if keys.get(m.name) != digest or kept is None or tuple(kept.shape) != shape:
            tensors[m.name], keys[m.name], changed = gram_matrix(rows[m.name], products), digest, True
        blocks[m.name] = GramBlock.build(m, rows[m.name], damping, absolute, products, gram=tensors[m.name])
    if changed:
        save_cache(path, tensors, {"format": GRAM_FORMAT, "keys": json.dumps(keys)})
    return blocks


def _rows_digest(rows: torch.Tensor, products: torch.dtype) -> str:
    """A content key of a block's rows [N, w] (float32) and the dtype K is computed in."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(rows.shape)}:{products}:".encode())
    h.update(rows.contiguous().numpy().data)
    return h.hexdigest()
