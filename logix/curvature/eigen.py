"""Eigendecompositions of symmetric curvature matrices, cached on disk by content digest.

The eigendecomposition (float64: curvature spectra span many decades) of a [w, w] block costs
seconds for w = 4096 on a small CPU, so it is cached in the segment's curvature dir as
`eigen-<kind>.safetensors`, keyed per matrix by a content digest of the statistics it came
from: changing the damping costs nothing, changed statistics invalidate only their entries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from logix.curvature.covariance import Statistics
from logix.store.format import write_atomic

EIGEN_FORMAT = "logix-eigen"


def _read_eigen_cache(path: Path) -> tuple[dict[str, str], Any]:
    try:
        f = safe_open(str(path), framework="pt")
        md = f.metadata() or {}
        if md.get("format") != EIGEN_FORMAT:
            return {}, None
        return json.loads(md.get("keys", "{}")), f
    except Exception:  # a damaged or foreign cache is recomputed, never trusted
        return {}, None


def eigendecompose(stats: Statistics, names: list[str], cache_path: Path | None,
                   device: torch.device | str = "cpu",
                   matrix: Callable[[str], torch.Tensor] | None = None,
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eigenpairs (e [w] ascending and clamped at 0, V [w, w] with eigenvectors as columns;
    float64 on CPU) of `matrix(key)` for every key in `names` (default matrix: F = S / N of a
    `raw` statistics), through the disk cache."""
    matrix = matrix or stats.fisher
    keys, handle = ({}, None) if cache_path is None or not cache_path.exists() else _read_eigen_cache(cache_path)
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        if handle is not None and keys.get(name) == stats.digest(name):
            result[name] = (handle.get_tensor(f"{name}.eigenvalues"), handle.get_tensor(f"{name}.eigenvectors"))
    missing = [n for n in names if n not in result]
    for name in missing:
        f = matrix(name).to(device)
        e, v = torch.linalg.eigh((f + f.T) / 2)
        result[name] = (e.clamp(min=0).cpu(), v.cpu())
    if missing and cache_path is not None:
        # Keep still-valid entries of other matrices, then replace the file atomically.
        keep = {n: (handle.get_tensor(f"{n}.eigenvalues"), handle.get_tensor(f"{n}.eigenvectors"))
                for n, k in keys.items()
                if handle is not None and n not in result and n in stats.tensors and k == stats.digest(n)}
        entries = {**keep, **result}
        tensors = {}
        for n, (e, v) in entries.items():
            tensors[f"{n}.eigenvalues"] = e.contiguous()
            tensors[f"{n}.eigenvectors"] = v.contiguous()
        md = {"format": EIGEN_FORMAT, "kind": stats.kind,
              "keys": json.dumps({n: stats.digest(n) for n in entries})}
        try:
            write_atomic(cache_path, lambda tmp: save_file(tensors, str(tmp), metadata=md))
        except OSError:
            pass  # a read-only store: recompute next time
    return result
