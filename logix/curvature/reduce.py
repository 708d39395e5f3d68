"""Curvature statistics across torch.distributed ranks: the sums logged during a run reduced
into one file at finalize, and the statistics a distributed query recomputes from the rows,
each rank streaming only its share."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from logix.comm import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    is_distributed,
    on_rank0,
    rank_and_world,
    together,
)
from logix.curvature.covariance import (
    ACCUMULATORS,
    CurvatureStatistics,
    Statistics,
    compute_statistics,
    save_recomputed,
    save_statistics,
    saved_statistics,
)
from logix.store.format import curvature_dir


def finish_statistics(statistics: CurvatureStatistics, ok: bool, failed: list[int]) -> None:
    """At the end of logging: save the row statistics logged during the run, summed over the
    ranks into one file per segment and kind when every rank closed cleanly, each rank's own
    file otherwise (the sums would not match the rows on disk)."""
    if not is_distributed():
        if ok:
            statistics.save()
        return
    if failed:
        if ok:
            statistics.save()
    else:
        reduce_statistics(statistics)


def reduce_statistics(statistics: CurvatureStatistics) -> None:
    """Sum every rank's curvature statistics (a CurvatureStatistics) with all_reduce and let
    rank 0 write them as `<kind>-r00000.safetensors` per segment; the other ranks then remove
    any file of their own (written by a `flush` or `start_segment` during the run). One file
    instead of one per rank: a raw block of width w takes 8·w² bytes per file. Should a crash
    leave both kinds of file, their row count exceeds the store's and the loader recomputes."""
    rank, world = rank_and_world()
    segments = sorted({s for seen in all_gather_object(statistics.segments) for s in seen})
    for segment in segments:
        directory = curvature_dir(statistics.run_dir, segment)
        for kind in statistics.kinds:
            local = statistics.statistics(segment, kind)
            total = Statistics(
                kind,
                local.modules,
                int(all_reduce_sum(torch.tensor([local.rows], dtype=torch.int64)).item()),
                {n: all_reduce_sum(local.tensors[n]) for n in sorted(local.tensors)},
            )
            on_rank0(
                partial(
                    save_statistics,
                    directory / f"{kind}-r00000.safetensors",
                    total,
                    {"segment": segment, "rank": "0", "ranks": json.dumps(list(range(world)))},
                )
            )
            if rank != 0:
                (directory / f"{kind}-r{rank:05d}.safetensors").unlink(missing_ok=True)
    barrier()


def share_statistics(
    store: Any,
    local: Any,
    kind: str,
    *,
    chunk_rows: int = 4096,
    progress: Callable[[str, int, int], None] | None = None,
) -> None:
    """Make sure row-derived curvature statistics of `kind` for `store` are on disk before the
    preconditioner is built: when neither the logged per-rank files nor a saved recompute cover
    the store, each rank streams only its `local` share, the float64 sums are all-reduced and
    rank 0 saves the result (`covariance.save_recomputed`). No rank streams the whole store for
    them. (EK-FAC's refitted eigenvalues are not split yet: rank 0 computes them in one pass over
    the whole store, once, then they are cached on disk.)"""
    if kind not in ACCUMULATORS:  # identity, or statistics that do not come from the rows
        return
    if on_rank0(lambda: saved_statistics(store, kind) is not None):
        return
    stats = together(lambda: compute_statistics(local, kind, chunk_rows=chunk_rows, progress=progress))
    for name in sorted(stats.tensors):  # the same order on every rank
        stats.tensors[name] = all_reduce_sum(stats.tensors[name])
    stats.rows = int(all_reduce_sum(torch.tensor([stats.rows], dtype=torch.int64)).item())
    on_rank0(lambda: save_recomputed(store, stats))
