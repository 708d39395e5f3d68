"""A tiny training that logs rows, records its trajectory and can die at a chosen step, for the
resume tests (tests/test_resume_trajectory.py) and the crash loop (scripts/crash_loop.py).

Step t trains on the ids `step_ids(t)` (unique per segment, so each step's rows are its own) at
learning rate `lr(t)`; a resumed life restores the trajectory's last complete checkpoint
(`run.restore_trajectory()`) and trains from there, the README's recipe for such a run."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

import logix

STEPS = 8
BATCH = 3
EVERY = 2
CONFIG = {
    "projection": {"kind": "identity"},
    "store": {"shard_rows": 64},
    "curvature": {"statistics": ["raw", "kfac"]},
}


def step_ids(t: int) -> list[int]:
    return [t * 100 + i for i in range(BATCH)]


def example(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input [3] float64 and label of id i (it depends on i only)."""
    k = i % 100 + (i // 100) * BATCH
    x = torch.cos(torch.arange(3.0, dtype=torch.float64) * (k + 1) * 0.7)
    return x, torch.tensor(k % 3)


def examples(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(example(i) for i in ids))
    return torch.stack(xs), torch.stack(ys)


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(torch.float64)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def lr(t: int) -> float:
    return 0.3 * 0.8**t


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=lr(0), momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.9)),
}


def train(
    run_dir,
    *,
    resume: bool = False,
    die_at: int | None = None,
    flush_at: int | None = None,
    optimizer: str = "sgd",
):
    """One life of the training: fresh, or resumed from the trajectory's last complete step.
    die_at: exit without any clean-up before that step's block (a kill); flush_at: run.flush()
    before that step's block (rows before it on disk); optimizer: a key of OPTIMIZERS."""
    model = make_model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    run = logix.init(run_dir, config=None if resume else CONFIG, resume=resume)
    run.watch(model, optimizer=opt, trajectory_every=EVERY)
    start = run.restore_trajectory() if resume else 0
    for t in range(start, STEPS):
        if t == flush_at:
            run.flush()
        if t == die_at:
            os._exit(9)
        for group in opt.param_groups:
            group["lr"] = lr(t) if optimizer == "sgd" else 0.05
        ids = step_ids(t)
        with run(data_id=ids):
            loss_fn(model, examples(ids)).mean().backward()
        opt.step()
        opt.zero_grad()
    run.finalize()
    return model


def replay(run_dir):
    """logix.unroll of the recorded training, on the first step-0 example as the query."""
    query = examples([0])
    return logix.unroll.unroll(run_dir, make_model(), loss_fn, examples, ([0], query), progress=False)
