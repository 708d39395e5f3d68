"""A tiny smooth model and a recorded training loop for the unroll tests (float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import logix

N, Q = 12, 4
# Blocks of each optimizer step: steps 1 and 4 accumulate two blocks.
STEPS = [
    [[0, 1, 2, 3]],
    [[4, 5], [6, 7]],
    [[8, 9, 10, 11]],
    [[1, 3, 5, 7]],
    [[0, 2], [4, 6, 8]],
    [[9, 10, 11, 2]],
]

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=0.01),
    "nesterov": lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.8, nesterov=True, dampening=0.0),
    "adam": lambda params: torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.9), weight_decay=0.02),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.05, betas=(0.85, 0.95), weight_decay=0.1),
}


def data(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N + Q, 3, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (N + Q,), generator=gen)
    return x[:N], y[:N], x[N:], y[N:]


def make_model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def train(
    kind: str,
    weights: torch.Tensor | None = None,
    record: str | None = None,
    every: int = 2,
    steps=STEPS,
    dtype=torch.float64,
    crash_at: int | None = None,
) -> nn.Module:
    """Train with example weights (default 1) under a step-decay schedule; with `record`, record
    the trajectory into that directory. crash_at: raise before that step (a crash)."""
    x, y, _, _ = data(dtype)
    w = torch.ones(N, dtype=dtype) if weights is None else weights
    model = make_model(dtype)
    opt = OPTIMIZERS[kind](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    rec = logix.record_trajectory(record, model, opt, every=every, overwrite=True) if record else None
    for t, blocks in enumerate(steps):
        if t == crash_at:
            raise RuntimeError("crash")
        for ids in blocks:
            ctx = rec(data_id=ids) if rec else _null()
            with ctx:
                (w[ids] * loss_fn(model, (x[ids], y[ids]))).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    if rec:
        rec.close()
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def examples(ids):
    x, y, _, _ = data()
    return x[ids], y[ids]


def queries():
    _, _, xq, yq = data()
    return list(range(100, 100 + Q)), (xq, yq)


def query_losses(model: nn.Module) -> torch.Tensor:
    _, _, xq, yq = data(next(model.parameters()).dtype)
    with torch.no_grad():
        return loss_fn(model, (xq, yq))
