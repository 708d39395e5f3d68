"""Eigendecompositions of symmetric curvature matrices, cached by content digest.

The eigendecomposition (float64: curvature spectra span many decades) of a [w, w] block costs
seconds for w = 4096 on a small CPU, so it is cached in the segment's curvature dir as
`eigen-<kind>.safetensors`, keyed per matrix by a content digest of the statistics it came
from: changing the damping costs nothing, changed statistics invalidate only their entries. The
cache carries a checksum of its tensors: a damaged one is recomputed (`store.cache`), and a
read-only store keeps it in a user cache dir or in memory. Before uncached blocks whose
eigendecomposition is estimated to take long start, a one-line notice (a warning) gives their
count, widths and the estimate (`eigh_seconds`: a timed [512, 512] `eigh` scaled by w³).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from logix.curvature.covariance import Statistics
from logix.notices import warn
from logix.store.cache import cache_keys, load_cache, save_cache

EIGEN_FORMAT = "logix-eigen"
NOTICE_SECONDS = 5.0  # an estimate at least this long is announced before the blocks start
PROBE_WIDTH = 512  # the timed eigendecomposition's width; narrower blocks are never announced
_seconds_per_cube: dict[str, float] = {}


def _eigh_seconds_per_cube(device: torch.device) -> float:
    """Seconds per w³ of a float64 `eigh` on `device`: the best of three [512, 512] ones,
    timed once per process and device (a few tens of ms on a CPU)."""
    key = str(device)
    if key not in _seconds_per_cube:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(PROBE_WIDTH, PROBE_WIDTH, dtype=torch.float64, generator=g).to(device)
        a = a @ a.T
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        best = float("inf")
        for _ in range(3):
            sync()
            start = time.perf_counter()
            torch.linalg.eigh(a)
            sync()
            best = min(best, time.perf_counter() - start)
        _seconds_per_cube[key] = max(best, 1e-9) / PROBE_WIDTH**3
    return _seconds_per_cube[key]


def eigh_seconds(widths: Iterable[int], device: torch.device | str = "cpu") -> float:
    """Estimated seconds of float64 `eigh` of [w, w] blocks of `widths` on `device` (O(w³))."""
    rate = _eigh_seconds_per_cube(torch.device(device))
    return sum(rate * float(w) ** 3 for w in widths)


def announce_eigh(widths: list[int], device: torch.device | str = "cpu") -> float | None:
    """Warn (one line: block count, widths, estimated time) before eigendecompositions of
    blocks of `widths` that are estimated to take at least NOTICE_SECONDS; the estimate or None."""
    if not widths or max(widths) < PROBE_WIDTH:
        return None
    seconds = eigh_seconds(widths, device)
    if seconds >= NOTICE_SECONDS:
        counts = ", ".join(f"{c} × {w}" for w, c in sorted(Counter(widths).items(), reverse=True))
        warn(
            f"eigendecomposing {len(widths)} curvature block(s) [w, w] in float64 on {device} "
            f"(widths: {counts}): about {seconds:.1f} s estimated (cached afterwards)",
        )
    return seconds


def _cached_pairs(cache_path: Path | None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(matrix name -> digest it was computed from, tensors) of a valid cache, else empty."""
    cached = None if cache_path is None else load_cache(cache_path, EIGEN_FORMAT)
    if cached is None:
        return {}, {}
    tensors, md = cached
    keys = {
        n: k
        for n, k in cache_keys(md).items()
        if f"{n}.eigenvalues" in tensors and f"{n}.eigenvectors" in tensors
    }
    return keys, tensors


def eigendecompose(
    stats: Statistics,
    names: list[str],
    cache_path: Path | None,
    device: torch.device | str = "cpu",
    matrix: Callable[[str], torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eigenpairs (e [w] ascending and clamped at 0, V [w, w] with eigenvectors as columns;
    float64 on CPU) of `matrix(key)` for every key in `names` (default matrix: F = S / N of a
    `raw` statistics), through the cache."""
    matrix = matrix or stats.fisher
    keys, tensors = _cached_pairs(cache_path)

    def pair(n: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tensors[f"{n}.eigenvalues"], tensors[f"{n}.eigenvectors"]

    result = {n: pair(n) for n in names if keys.get(n) == stats.digest(n)}
    missing = [n for n in names if n not in result]
    announce_eigh([int(stats.tensors[n].shape[0]) for n in missing if n in stats.tensors], device)
    for name in missing:
        f = matrix(name).to(device)
        e, v = torch.linalg.eigh((f + f.T) / 2)
        result[name] = (e.clamp(min=0).cpu(), v.cpu())
    if missing and cache_path is not None:
        # Keep still-valid entries of other matrices, then replace the cache.
        keep = {
            n: pair(n)
            for n, k in keys.items()
            if n not in result and n in stats.tensors and k == stats.digest(n)
        }
        entries = {**keep, **result}
        out = {}
        for n, (e, v) in entries.items():
            out[f"{n}.eigenvalues"] = e
            out[f"{n}.eigenvectors"] = v
        save_cache(
            cache_path,
            out,
            {
                "format": EIGEN_FORMAT,
                "kind": stats.kind,
                "keys": json.dumps({n: stats.digest(n) for n in entries}),
            },
        )
    return result
