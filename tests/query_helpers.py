"""Helpers for the curvature / engine tests: exact per-example gradients and small stores."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from logix.curvature.covariance import CurvatureStatistics
from logix.store.format import FORMAT_NAME, FORMAT_VERSION, ModuleInfo, write_json_atomic
from logix.store.gradients import Gradients
from logix.store.writer import StoreWriter

FINGERPRINT = "ab" * 32


def mlp_modules() -> list[ModuleInfo]:
    """Module table of the MLP 5 → 4 → 3 (with biases) under the identity projection."""
    return [
        ModuleInfo("fc1", "Linear", 6, 4, 6, 4, True, 0),
        ModuleInfo("fc2", "Linear", 5, 3, 5, 3, True, 24),
    ]


def mlp_rows(n: int, seed: int) -> torch.Tensor:
    """Exact per-example gradients of an MLP's cross-entropy loss as store rows [n, 39] float64.

    Per Linear module the block is [d_out, d_in + 1] (bias last column) flattened row-major.
    """
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(5, 4))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(4, 3))
    model = model.double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    blocks = [
        torch.cat([g[f"{m}.weight"], g[f"{m}.bias"].unsqueeze(2)], dim=2).reshape(n, -1)
        for m in ("fc1", "fc2")
    ]
    return torch.cat(blocks, dim=1)


def write_manifest(
    run_dir: Path, modules: list[ModuleInfo], dtype: str = "float32", fingerprint: str = FINGERPRINT
) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    width = sum(m.width for m in modules)
    write_json_atomic(
        run_dir / "manifest.json",
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": {},
            "modules": [m.to_dict() for m in modules],
            "width": width,
            "dtype": dtype,
            "fingerprint": fingerprint,
            "projection": {"kind": "identity", "notes": []},
            "created": "2024-01-01T00:00:00",
            "logix_version": "0.1.0",
        },
    )
    return run_dir


def build_store(
    run_dir: Path,
    modules: list[ModuleInfo],
    rows: torch.Tensor,
    ids: list | None = None,
    *,
    shard_rows: int = 16,
    statistics: bool = True,
    dtype: str = "float32",
) -> Path:
    """A store holding `rows` (one segment "0"), with logged raw statistics unless told not."""
    write_manifest(run_dir, modules, dtype)
    ids = list(range(rows.shape[0])) if ids is None else ids
    stats = CurvatureStatistics(run_dir, modules) if statistics else None
    writer = StoreWriter(
        run_dir, width=rows.shape[1], dtype=dtype, shard_rows=shard_rows, observers=[stats] if stats else []
    )
    writer.start_segment("0")
    for i in range(0, rows.shape[0], 10):
        writer.add(ids[i : i + 10], rows[i : i + 10].float())
    writer.close()
    if stats:
        stats.save()
    return Path(run_dir)


def queries(rows: torch.Tensor, modules: list[ModuleInfo], fingerprint: str = FINGERPRINT) -> Gradients:
    return Gradients(rows.float(), [f"q{i}" for i in range(rows.shape[0])], modules, fingerprint)


def reference_scores(
    q: torch.Tensor, x: torch.Tensor, modules: list[ModuleInfo], damping: float, absolute: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 g_qᵀ (F + λI)⁻¹ g_z with block-diagonal F from x; also H⁻¹ = (F+λI)⁻¹."""
    q, x = q.double(), x.double()
    width = x.shape[1]
    hinv = torch.zeros(width, width, dtype=torch.float64)
    for m in modules:
        b = x[:, m.columns]
        f = b.T @ b / x.shape[0]
        lam = damping if absolute else damping * torch.trace(f) / m.width
        hinv[m.columns, m.columns] = torch.linalg.inv(f + lam * torch.eye(m.width, dtype=torch.float64))
    return q @ hinv @ x.T, hinv
