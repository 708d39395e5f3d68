"""Curvature statistics in projected space: the file format, and the `raw` kind from stored rows.

The `raw` statistic of module m is the empirical Fisher sum in projected space

    S_m = Σ_n vec(G̃_{n,m}) vec(G̃_{n,m})ᵀ      [w, w], w = r_in·r_out

kept as a float64 sum together with the row count N, so that per-rank files add up and
`F_m = S_m / N`. Each shard adds one float32 GEMM per module into the float64 accumulator.

On disk (one file per kind, rank and segment; never pickled):

    curvature/<segment>/raw-r00000.safetensors    written by `CurvatureStatistics.save` (under
                                                  torch.distributed: all ranks' sums, reduced
                                                  at finalize by `curvature.reduce.finish_statistics`)
    curvature/<segment>/raw-stream.safetensors    a streaming recompute over the whole store
    curvature/<segment>/kfac-r00000.safetensors   K-FAC factors from the capture hooks (kfac.py)

Each file holds float64 tensors keyed by module name (`raw`) or `<module>.A` / `<module>.S`
(`kfac`), and metadata with the kind, the row count, the module table and, for factor kinds,
the positions per module (file format: `statistics.py`). Row-derived kinds register an
accumulator in `ACCUMULATORS`; factor kinds (`vocabulary.FACTOR_STATISTICS`) come from the
capture stage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from logix.curvature.statistics import (  # noqa: F401  (the file format's names, used from here)
    FORMAT,
    Statistics,
    load_statistics,
    read_statistics,
    save_statistics,
    statistics_from,
    statistics_metadata,
)
from logix.errors import StoreError
from logix.progress import ProgressFn  # noqa: F401  (re-exported: fn(phase, done, total))
from logix.store.cache import load_cache, rows_key, save_cache
from logix.store.format import ModuleInfo, curvature_dir
from logix.vocabulary import FACTOR_STATISTICS

MAX_RAW_WIDTH = 8192  # a raw block of this width: 512 MiB in float64, minutes of eigh on a CPU


class Accumulator(Protocol):
    """Adds shards of rows [n, D] (float32) into float64 tensors keyed by name."""

    rows: int

    def update(self, rows: torch.Tensor) -> None: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...


class RawAccumulator:
    """Σ_n vec(G̃_n) vec(G̃_n)ᵀ per module: `tensors()[name]` is [w, w] float64."""

    def __init__(self, modules: list[ModuleInfo]) -> None:
        too_wide = [m for m in modules if m.width > MAX_RAW_WIDTH]
        if too_wide:
            m = too_wide[0]
            raise StoreError(
                f"module {m.name!r} has r_in·r_out = {m.r_in}·{m.r_out} = {m.width} columns: its raw "
                f"Fisher would be a {m.width}² float64 matrix ({m.width**2 * 8 / 2**30:.1f} GiB) "
                f"and its eigendecomposition would take hours; raw curvature is for blocks of at "
                f"most {MAX_RAW_WIDTH} columns. Log with a random projection of smaller ranks, or "
                "query with preconditioner='identity'"
            )
        self.modules = list(modules)
        self.rows = 0
        self.sums = {m.name: torch.zeros(m.width, m.width, dtype=torch.float64) for m in modules}

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float32)
        for m in self.modules:
            block = rows[:, m.columns]  # a strided view: BLAS takes it with lda = D, no copy
            self.sums[m.name] += (block.T @ block).to(torch.float64)
        self.rows += rows.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.sums


ACCUMULATORS: dict[str, Callable[[list[ModuleInfo]], Accumulator]] = {"raw": RawAccumulator}


def check_kinds(kinds: Iterable[str]) -> list[str]:
    """The statistics kinds to accumulate from rows; `identity` needs none and the factor kinds
    (`kfac`, `ekfac`) are collected by the capture hooks instead."""
    out = []
    for kind in kinds:
        if kind == "identity" or kind in FACTOR_STATISTICS:
            continue
        if kind not in ACCUMULATORS:
            raise ValueError(
                f"unknown curvature statistics {kind!r}; choose from "
                f"{list(ACCUMULATORS) + list(FACTOR_STATISTICS)}"
            )
        out.append(kind)
    return out


class CurvatureStatistics:
    """Store-writer observer: `stats(segment, rows)` for every shard, `save()` at the end.

    Called from the writer's background thread; `save` may come from another thread.
    Writes `curvature/<segment>/<kind>-r{rank:05d}.safetensors` per segment seen.
    """

    def __init__(
        self, run_dir: str | Path, modules: list[ModuleInfo], rank: int = 0, kinds: Iterable[str] = ("raw",)
    ) -> None:
        self.run_dir = Path(run_dir)
        self.modules = list(modules)
        self.rank = int(rank)
        self.kinds = check_kinds(kinds)
        self._acc: dict[str, dict[str, Accumulator]] = {}  # segment -> kind -> accumulator
        self._saved_rows: dict[str, int] = {}  # segment -> rows covered by the files on disk
        self._lock = threading.Lock()

    def __call__(self, segment: str, rows: torch.Tensor) -> None:
        self.update(segment, rows)

    def update(self, segment: str, rows: torch.Tensor) -> None:
        """Add rows [n, D] of `segment`."""
        with self._lock:
            accs = self._acc.get(segment)
            if accs is None:
                accs = self._acc[segment] = {k: ACCUMULATORS[k](self.modules) for k in self.kinds}
            for acc in accs.values():
                acc.update(rows)

    @property
    def segments(self) -> list[str]:
        """The segments that received rows, in order of appearance."""
        with self._lock:
            return list(self._acc)

    def rows(self, segment: str) -> int:
        with self._lock:
            accs = self._acc.get(segment, {})
            return next(iter(accs.values())).rows if accs else 0

    def statistics(self, segment: str, kind: str = "raw") -> Statistics:
        """The sums of `segment` so far (zeros over 0 rows for a segment without rows here)."""
        with self._lock:
            acc = self._acc[segment][kind] if segment in self._acc else ACCUMULATORS[kind](self.modules)
            return Statistics(kind, self.modules, acc.rows, dict(acc.tensors()))

    def save(self, segment: str | None = None) -> list[Path]:
        """Write the statistics of `segment` (all segments seen if None) that changed since the
        last save; returns the files written."""
        with self._lock:
            segments = [segment] if segment is not None else list(self._acc)
        paths = []
        for seg in segments:
            rows = self.rows(seg)
            if self._saved_rows.get(seg) == rows:
                continue
            self._saved_rows[seg] = rows
            for kind in self.kinds:
                if seg not in self._acc:
                    continue
                path = curvature_dir(self.run_dir, seg) / f"{kind}-r{self.rank:05d}.safetensors"
                paths.append(
                    save_statistics(
                        path, self.statistics(seg, kind), {"segment": seg, "rank": str(self.rank)}
                    )
                )
        return paths


def compute_statistics(
    store: Any, kind: str = "raw", *, chunk_rows: int = 4096, progress: ProgressFn | None = None
) -> Statistics:
    """One streaming pass over `store` (a `Store`) accumulating statistics of `kind`."""
    check_kinds([kind])
    acc = ACCUMULATORS[kind](list(store.modules))
    total = len(store)
    for _, rows in store.iter_chunks(rows=chunk_rows, dtype=torch.float32):
        acc.update(rows)
        if progress is not None:
            progress("curvature", acc.rows, total)
    return Statistics(kind, list(store.modules), acc.rows, dict(acc.tensors()), ["stream"])


def saved_statistics(store: Any, kind: str = "raw") -> Statistics | None:
    """Statistics on disk that cover exactly the store's rows, or None.

    The per-rank files from logging are used when their row count and module table match the
    store; otherwise (logged without statistics, or a crash and resume left them stale) a saved
    recompute `<kind>-stream.safetensors` is used when it was computed from the same rows
    (`store.cache.rows_key`: the shards' checksums, the projections' fingerprint).
    """
    directory = Path(store.curvature_dir)
    modules = list(store.modules)
    n = len(store)
    if kind not in ACCUMULATORS:
        raise ValueError(
            f"{kind!r} statistics are not computed from stored rows; load them with "
            "logix.curvature.kfac.load_factors (kfac) or log them"
        )
    logged = load_statistics(directory, kind)
    if logged is not None and logged.rows == n and logged.modules == modules:
        return logged
    stream_path = directory / f"{kind}-stream.safetensors"
    cached = load_cache(stream_path, FORMAT)  # damaged or failing its checksum: None
    if cached is not None:
        try:
            stats = statistics_from(stream_path, *cached)
        except StoreError:
            return None
        same_rows = cached[1].get("rows_key") == rows_key(store)
        if stats.rows == n and stats.modules == modules and same_rows:
            return stats
    return None


def save_recomputed(store: Any, stats: Statistics) -> None:
    """Keep a recompute over the whole store as `<kind>-stream.safetensors` for next time (in a
    user cache dir or in memory when the store is read-only, see `store.cache`)."""
    path = Path(store.curvature_dir) / f"{stats.kind}-stream.safetensors"
    save_cache(path, stats.tensors, statistics_metadata(stats, {"rows_key": rows_key(store)}))


def statistics_for(
    store: Any,
    kind: str = "raw",
    *,
    chunk_rows: int = 4096,
    progress: ProgressFn | None = None,
    save: bool = True,
) -> Statistics:
    """Statistics covering exactly the store's rows: `saved_statistics`, else recomputed in
    one streaming pass (and saved with `save_recomputed`)."""
    stats = saved_statistics(store, kind)
    if stats is not None:
        return stats
    stats = compute_statistics(store, kind, chunk_rows=chunk_rows, progress=progress)
    if save:
        save_recomputed(store, stats)
    return stats
