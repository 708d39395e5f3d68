"""Eigendecompositions of symmetric curvature matrices, cached by content digest.

The eigendecomposition (float64: curvature spectra span many decades) of a [w, w] block costs
seconds for w = 4096 on a small CPU, so it is cached in the segment's curvature dir as
`eigen-<kind>.safetensors`, keyed per matrix by a content digest of the statistics it came
from: changing the damping costs nothing, changed statistics invalidate only their entries. The
cache carries a checksum of its tensors: a damaged one is recomputed (`store.cache`), and a
read-only store keeps it in a user cache dir or in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from logix.curvature.covariance import Statistics
from logix.store.cache import load_cache, save_cache

EIGEN_FORMAT = "logix-eigen"


def _cached_pairs(cache_path: Path | None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(matrix name -> digest it was computed from, tensors) of a valid cache, else empty."""
    cached = None if cache_path is None else load_cache(cache_path, EIGEN_FORMAT)
    if cached is None:
        return {}, {}
    tensors, md = cached
    try:
        keys = json.loads(md.get("keys", "{}"))
    except ValueError:
        return {}, {}
    keys = {n: k for n, k in keys.items() if f"{n}.eigenvalues" in tensors and f"{n}.eigenvectors" in tensors}
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
