"""Shared helpers for the store tests: a minimal manifest and deterministic rows."""

from __future__ import annotations

from pathlib import Path

import torch

from logix.store.format import FORMAT_NAME, FORMAT_VERSION, write_json_atomic

MODULES = [
    {
        "name": "fc1",
        "type": "Linear",
        "d_in": 5,
        "d_out": 4,
        "r_in": 3,
        "r_out": 2,
        "bias": True,
        "offset": 0,
    },
    {
        "name": "fc2",
        "type": "Linear",
        "d_in": 4,
        "d_out": 3,
        "r_in": 2,
        "r_out": 1,
        "bias": False,
        "offset": 6,
    },
]
WIDTH = 8


def make_store(
    run_dir: Path, *, width: int = WIDTH, dtype: str = "float32", modules: list | None = None
) -> Path:
    """Create `run_dir` with the manifest a Run would write (no projections needed here)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if modules is None:
        modules = (
            MODULES
            if width == WIDTH
            else [
                {
                    "name": "lin",
                    "type": "Linear",
                    "d_in": width,
                    "d_out": 1,
                    "r_in": width,
                    "r_out": 1,
                    "bias": False,
                    "offset": 0,
                }
            ]
        )
    write_json_atomic(
        run_dir / "manifest.json",
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": {"store": {"dtype": dtype}},
            "modules": modules,
            "width": width,
            "dtype": dtype,
            "fingerprint": "0" * 64,
            "projection": {"kind": "random", "seed": 0, "notes": ["fc2: rank_out 4 clamped to 1"]},
            "created": "2024-01-01T00:00:00",
            "logix_version": "0.1.0",
        },
    )
    return run_dir


def rows_for(ids, width: int = WIDTH) -> torch.Tensor:
    """Deterministic float32 rows [len(ids), width] for int ids (exact in bfloat16 too)."""
    base = torch.tensor([float(i % 97) for i in ids]).unsqueeze(1)
    return (base + torch.arange(width, dtype=torch.float32)) / 4


def snapshot(run_dir: Path) -> dict:
    """Every file under run_dir with its bytes: to check that a failed call changed nothing
    (writer lock files are left out: they record who last held the lock, not store data)."""
    return {
        p.relative_to(run_dir).as_posix(): p.read_bytes()
        for p in sorted(Path(run_dir).rglob("*"))
        if p.is_file() and p.suffix != ".lock"
    }
