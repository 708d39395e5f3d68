"""Choosing an index's nprobe by measured recall: the build's own check of what it returns.

256 rows of the build's sample, held out of the quantizer's training, serve as calibration
queries. While the build's one pass adds the rows to the index, their exact top-(k+1) by the
index's metric is kept from the same chunks (one small product per chunk, `query/topk.py`'s
exact running top-k). After the pass, nprobe is the smallest number of cells (doubling, then
bisecting) whose search finds a share `target` of each query's exact top k, less two
standard errors of that mean over the queries (so that fresh queries reach it too: at 1M rows
the plain mean of 256 sampled rows said 0.96 where 100 fresh queries found 0.926), every
query's own row left out of both lists. The record keeps the recall measured at the chosen nprobe: the
figure `logix index --info` reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from logix.query.topk import new_best, unpack, update_best

CALIBRATION_QUERIES = 256
CALIBRATION_K = 100


class ExactNeighbours:
    """The exact top-(k+1) rows of calibration queries q [n, D] float32 (prepared for the
    metric, unit rows for cosine), accumulated chunk by chunk in row order; `rows` [n] are the
    queries' own row indices."""

    def __init__(self, q: torch.Tensor, rows: torch.Tensor, k: int) -> None:
        self.q, self.rows, self.k = q, rows, int(k)
        self.best = new_best(q.shape[0], torch.device("cpu"))

    def add(self, x: torch.Tensor, start: int) -> None:
        """Chunk x [c, D] (prepared like q) of rows start, start + 1, …"""
        self.best = update_best(self.best, self.q @ x.T, start, self.k + 1)

    def neighbours(self) -> list[set[int]]:
        """Each query's exact top k, its own row left out."""
        _, index = unpack(self.best)
        return [_without(row, own, self.k) for row, own in zip(index.tolist(), self.rows.tolist())]


def _without(row: list[int], own: int, k: int) -> set[int]:
    return set([j for j in row if j != own][:k])


def recall_at(index: Any, exact: ExactNeighbours, nprobe: int) -> tuple[float, float]:
    """(the share of the calibration queries' exact top k that `index` finds scanning nprobe
    cells, that share less two standard errors of the mean over queries: what a fresh set of
    queries can be expected to reach)."""
    index.nprobe = int(nprobe)
    _, found = index.search(np.ascontiguousarray(exact.q.numpy()), exact.k + 1)
    truth = exact.neighbours()
    per_query = torch.tensor(
        [
            len(_without(f, own, exact.k) & t) / max(1, len(t))
            for f, own, t in zip(found.tolist(), exact.rows.tolist(), truth)
        ],
        dtype=torch.float64,
    )
    mean = float(per_query.mean())
    spread = float(per_query.std()) if len(per_query) > 1 else 0.0
    return mean, mean - 2.0 * spread / len(per_query) ** 0.5


def calibrated_nprobe(
    index: Any, exact: ExactNeighbours, nlist: int, target: float
) -> tuple[int, tuple[float, float]]:
    """(the fewest cells whose recall less two standard errors reaches `target`, its
    `recall_at`); nlist (exhaustive) if none fewer does."""
    low, high = 0, 1  # the bound misses the target at low (0: no cells); high: unknown
    measured: dict[int, tuple[float, float]] = {}

    def bound(p: int) -> float:
        if p not in measured:
            measured[p] = recall_at(index, exact, p)
        return measured[p][1]

    while high < nlist and bound(high) < target:
        low, high = high, min(nlist, 2 * high)
    if bound(high) < target:
        return high, measured[high]
    while high - low > 1:
        mid = (low + high) // 2
        if bound(mid) >= target:
            high = mid
        else:
            low = mid
    return high, measured[high]
