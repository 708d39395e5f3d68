"""A tiny logged model for the store-guarantee tests: deterministic data, a clean reference run,
and the README's resume recipe (used by the CI crash test and scripts/crash_loop.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import logix

N_IDS = 240
BATCH = 6
CONFIG = {
    "projection": {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 3},
    "store": {"shard_rows": 8},
    "curvature": {"statistics": ["raw", "kfac"], "during_logging": True},
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def data(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of the examples `ids` (each example depends only on its id)."""
    x = torch.stack([torch.sin(torch.arange(5.0) * (i + 1) * 0.37) for i in ids])
    y = torch.tensor([i % 3 for i in ids])
    return x, y


def log(run, m: nn.Module, ids: list[int], on_batch=None) -> None:
    """Log `ids` in batches of BATCH (no optimizer step: rows depend on the id only)."""
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        x, y = data(batch)
        with run(data_id=batch):
            nn.functional.cross_entropy(m(x), y).backward()
        m.zero_grad()
        if on_batch is not None:
            on_batch(batch)


def clean_run(run_dir: Path, ids: list[int] | None = None) -> Path:
    """A run that logs `ids` (default all) in one go and finalizes."""
    with logix.init(run_dir, config=CONFIG) as run:
        m = model()
        run.watch(m)
        log(run, m, list(range(N_IDS)) if ids is None else ids)
    return Path(run_dir)


def resume_recipe(run_dir: Path, all_ids: list[int]) -> None:
    """The README's resume recipe: reopen with resume=True, skip run.logged_ids(), log the rest."""
    run = logix.init(run_dir, resume=True)
    m = model()
    run.watch(m)
    done = run.logged_ids()
    log(run, m, [i for i in all_ids if i not in done])
    run.finalize()


def rows_by_id(run_dir: Path) -> dict:
    """id -> stored row (float32), checking every id appears once."""
    store = logix.open_store(run_dir, verify="full")
    ids = store.data_ids
    assert len(ids) == len(set(ids)), "an id is stored twice"
    rows = store.load()
    return {i: rows[k] for k, i in enumerate(ids)}
