"""Block-diagonal preconditioners: map query rows Q [n, D] to Q' = Q (F + λI)⁻¹ per module.

- `identity`: F = 0 and no damping, so Q' = Q (plain gradient dot products, TracIn-style).
- `raw`: F_m = S_m / N from `covariance.py`, inverted through its eigendecomposition
  F_m = V diag(e) Vᵀ: (F_m + λ_m I)⁻¹ = V diag(1 / (e + λ_m)) Vᵀ. With `fisher="empirical"`
  S_m sums the stored rows; with `fisher="true"` it sums the pseudo-gradients of a
  `run.fit_curvature(fisher="true")` pass (labels drawn from the model: Gauss–Newton).

Damping is `λ_m = damping · mean eigenvalue of F_m` (= trace / w), or `λ_m = damping` when
`absolute=True`. The eigendecomposition (float64: F's spectrum spans many decades) costs
seconds for w = 4096 on a small CPU, so it is cached in the segment's curvature dir as
`eigen-<kind>.safetensors` (`eigen-raw.true.safetensors` for the true Fisher), keyed by a
content digest of the statistics it came from: changing the damping costs nothing, changed
statistics invalidate the entry.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from logix.curvature.covariance import ProgressFn, Statistics, statistics_for, true_fisher_statistics
from logix.store.format import ModuleInfo, StoreError, total_width, write_atomic

PRECONDITIONERS = ("identity", "raw")
FISHERS = ("empirical", "true")  # the curvature's label distribution: the data's or the model's
PLANNED = ("kfac", "ekfac")
EIGEN_FORMAT = "logix-eigen"


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """`value` if it is one of `choices`, else a ValueError naming the closest valid one."""
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown {what} {value!r}; {hint}choose from {', '.join(choices)}")


@dataclass
class Block:
    """The preconditioner of one module: eigenpairs of F_m and its damping λ_m."""

    module: ModuleInfo
    eigenvalues: torch.Tensor   # [w] float64, clamped at 0
    eigenvectors: torch.Tensor  # [w, w] float64, columns are eigenvectors
    damping: float              # λ_m

    def inverse_sqrt_factor(self) -> torch.Tensor:
        """W = V diag((e + λ)^-1/2), [w, w] float64, so that W Wᵀ = (F + λI)⁻¹."""
        return self.eigenvectors * (self.eigenvalues + self.damping).rsqrt()


class Preconditioner:
    """Applies (F + λI)⁻¹ block by block to rows of width D.

    Only `selected` modules contribute: their blocks are preconditioned, every other column
    is zeroed, so scores against full train rows sum over the selected modules only.
    `blocks` is None for `identity`.
    """

    def __init__(self, kind: str, modules: list[ModuleInfo], selected: list[str],
                 blocks: dict[str, Block] | None, fisher: str = "empirical") -> None:
        self.kind = kind
        self.fisher = fisher
        self.modules = list(modules)
        self.selected = [m for m in modules if m.name in set(selected)]
        self.blocks = blocks
        self.width = total_width(modules)
        self._factors: dict[Any, list[torch.Tensor | None]] = {}

    @property
    def dampings(self) -> dict[str, float]:
        """λ_m per selected module (empty for identity)."""
        return {k: b.damping for k, b in (self.blocks or {}).items()}

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """Q' = Q (F + λI)⁻¹ per block: [n, D] -> [n, D] float64 (on q's device)."""
        q = q.to(torch.float64)
        out = torch.zeros_like(q)
        for m in self.selected:
            block = q[:, m.columns]
            if self.blocks is not None:
                b = self.blocks[m.name]
                v = b.eigenvectors.to(q.device)
                e = (b.eigenvalues + b.damping).to(q.device)
                block = ((block @ v) / e) @ v.T
            out[:, m.columns] = block
        return out

    def quadratic(self, x: torch.Tensor, per_module: bool = False) -> torch.Tensor:
        """xᵀ (F + λI)⁻¹ x for every row: [n] (or [n_modules, n] per selected module).

        Computed as ‖x_m W_m‖² in x's floating dtype (float32 for train chunks), so it is
        never negative; one [n, w] × [w, w] product per module.
        """
        factors = self._factors_on(x.device, x.dtype)
        parts = []
        for m, w in zip(self.selected, factors):
            block = x[:, m.columns]
            if w is not None:
                block = block @ w
            parts.append((block * block).sum(dim=1))
        if not parts:
            parts = [x.new_zeros(x.shape[0])]
        stacked = torch.stack(parts)
        return stacked if per_module else stacked.sum(dim=0)

    def _factors_on(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor | None]:
        key = (str(device), dtype)
        if key not in self._factors:
            self._factors[key] = [
                None if self.blocks is None
                else self.blocks[m.name].inverse_sqrt_factor().to(device=device, dtype=dtype)
                for m in self.selected
            ]
        return self._factors[key]


def damping_value(eigenvalues: torch.Tensor, damping: float, absolute: bool) -> float:
    """λ = damping (absolute) or damping · mean eigenvalue; `damping` where F is zero."""
    if absolute:
        return float(damping)
    mean = float(eigenvalues.mean()) if eigenvalues.numel() else 0.0
    return float(damping) * mean if mean > 0 else float(damping)


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
                   device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eigenpairs (e [w], V [w, w], float64 on CPU) of F_m for `names`, via the disk cache."""
    keys, handle = ({}, None) if cache_path is None or not cache_path.exists() else _read_eigen_cache(cache_path)
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        if handle is not None and keys.get(name) == stats.digest(name):
            result[name] = (handle.get_tensor(f"{name}.eigenvalues"), handle.get_tensor(f"{name}.eigenvectors"))
    missing = [n for n in names if n not in result]
    for name in missing:
        f = stats.fisher(name).to(device)
        e, v = torch.linalg.eigh((f + f.T) / 2)
        result[name] = (e.clamp(min=0).cpu(), v.cpu())
    if missing and cache_path is not None:
        # Keep still-valid entries of other modules, then replace the file atomically.
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


def build_preconditioner(store: Any, kind: str = "raw", damping: float = 0.1, *,
                         absolute: bool = False, modules: list[str] | None = None,
                         device: torch.device | str = "cpu", chunk_rows: int = 4096,
                         progress: ProgressFn | None = None,
                         fisher: str = "empirical") -> Preconditioner:
    """The preconditioner of `kind` for `store`'s segment, over `modules` (all if None).

    fisher: "empirical" (statistics of the stored rows, recomputed if missing) or "true" (the
    `<kind>.true` statistics of a `run.fit_curvature(fisher="true")` pass; an error if absent).
    """
    if kind in PLANNED:
        raise ValueError(f"preconditioner {kind!r} is not available yet; use 'raw' or 'identity'")
    check_choice(kind, PRECONDITIONERS, "preconditioner")
    check_choice(fisher, FISHERS, "fisher")
    table = list(store.modules)
    selected = [m.name for m in table] if modules is None else list(modules)
    if kind == "identity":
        return Preconditioner(kind, table, selected, None, fisher)
    if not damping > 0:
        raise ValueError(f"damping must be > 0 for the {kind!r} preconditioner, got {damping}")
    if fisher == "true":
        stats = true_fisher_statistics(store, kind)
    else:
        stats = statistics_for(store, kind, chunk_rows=chunk_rows, progress=progress)
    if stats.rows == 0:
        raise StoreError("the curvature statistics cover no rows; the store segment is empty")
    cache = Path(store.curvature_dir) / f"eigen-{stats.kind}.safetensors"
    eig = eigendecompose(stats, selected, cache, device)
    blocks = {}
    for m in table:
        if m.name in eig:
            e, v = eig[m.name]
            blocks[m.name] = Block(m, e, v, damping_value(e, damping, absolute))
    return Preconditioner(kind, table, selected, blocks, fisher)
