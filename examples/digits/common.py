"""The digits task shared by the demo, the LDS evaluation and the mislabel example.

1,797 8×8 handwritten digits (UCI optical recognition of handwritten digits, as shipped in
`digits.npz`), split once with a fixed seed into 1,397 training and 400 test images; an MLP
64-256-10 trained with SGD. Everything here is deterministic given the seed.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
N_TEST = 400


@dataclass
class Digits:
    x_train: torch.Tensor  # [1397, 64] float32 in [0, 1]
    y_train: torch.Tensor  # [1397] int64
    x_test: torch.Tensor  # [400, 64]
    y_test: torch.Tensor  # [400]


def load_digits(seed: int = 0) -> Digits:
    data = np.load(HERE / "digits.npz")
    x = torch.from_numpy(data["images"].reshape(-1, 64).astype(np.float32) / 16.0)
    y = torch.from_numpy(data["labels"].astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:N_TEST], order[N_TEST:]
    return Digits(x[train], y[train], x[test], y[test])


def make_mlp(seed: int = 0, hidden: int = 256) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(64, hidden), relu=nn.ReLU(), fc2=nn.Linear(hidden, 10)))


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 0.1,
    run=None,
    log_epochs: int = 1,
    ids: list | None = None,
    hidden: int = 256,
) -> nn.Module:
    """Train the MLP with SGD + momentum; with `run`, log the last `log_epochs` epochs, each in
    its own segment named 'epoch-<k>' carrying its learning rate (ids default to row numbers).
    `hidden`: the width of the hidden layer (smaller for proxy models).

    The logging is the three lines of logix: `run.watch(model)`, `with run(data_id=ids):` around
    the forward/backward, and the caller's `run.finalize()` (or `with logix.init(...)`)."""
    model = make_mlp(seed, hidden)
    if run is not None:
        run.watch(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = list(range(len(y))) if ids is None else ids
    for epoch in range(epochs):
        logging = run is not None and epoch >= epochs - log_epochs
        if logging:
            run.start_segment(f"epoch-{epoch}", lr=lr)
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            step = run(data_id=[ids[i] for i in idx.tolist()]) if logging else contextlib.nullcontext()
            with step:
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
            opt.step()
            opt.zero_grad()
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def retrained_test_losses(
    data: Digits, n_test: int, *, subsets: int, seeds: int, epochs: int, out_dir: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LDS ground truth of the digits examples: `subsets` random halves of the training set
    (seed 0), an MLP retrained on each with every seed, and the loss of each of the first
    `n_test` test images. Cached under `out_dir` (resumable; shared by lds.py and proxy.py).
    Returns (membership [M, n_train] bool, losses [M, n_test] averaged over the seeds)."""
    from logix.eval import retrain_outputs, sample_subsets

    x_test, y_test = data.x_test[:n_test], data.y_test[:n_test]
    halves = sample_subsets(len(data.y_train), subsets, alpha=0.5, seed=0)

    def train_fn(members: torch.Tensor, seed: int) -> torch.Tensor:
        m = train_mlp(data.x_train[members], data.y_train[members], epochs=epochs, seed=seed)
        with torch.no_grad():
            return F.cross_entropy(m(x_test), y_test, reduction="none")

    cache = Path(out_dir) / f"retrain-epochs{epochs}-test{n_test}"
    return halves, retrain_outputs(train_fn, halves, out_dir=cache, seeds=range(seeds))
