"""Single-model LDS: how well scores predict retraining the *same* run with some data removed.

The multi-seed LDS (`logix.eval.lds`) retrains on random subsets with fresh batches and seeds;
it asks about the recipe. Attribution through one recorded trajectory (`logix.unroll`) answers a
narrower question — what happens to *this* run — so its ground truth keeps the seed, the
initialisation and the batch order and only sets the removed examples' loss weights to zero.
Small drop fractions (1–10%) test the local, linear regime; 50% tests how far it reaches.

    results = single_model_lds(scores, train_fn, n_train, fractions=(0.01, 0.05, 0.1, 0.5),
                               n_subsets=100, seed=0, out_dir="out/single")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from logix.eval.lds import LDSResult, lds
from logix.eval.retrain import TrainFn, retrain_outputs, sample_subsets


def drop_subsets(n_train: int, n_subsets: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """[n_subsets, n_train] bool: the examples *kept* when a random `fraction` is dropped."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"drop fraction must be in (0, 1), got {fraction}")
    return sample_subsets(n_train, n_subsets, alpha=1.0 - fraction, seed=seed)


def single_model_outputs(
    train_fn: TrainFn,
    n_train: int,
    fraction: float,
    n_subsets: int,
    *,
    seed: int = 0,
    subset_seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept [M, n_train] bool, outputs [M, n_test]) for one drop fraction.

    train_fn(kept_indices, seed) must rerun the recorded recipe with that seed and its batch
    order, with every example outside kept_indices weighted 0 (not removed from the batches).
    Outputs are cached per subset under out_dir/drop-<fraction> (resumable)."""
    kept = drop_subsets(n_train, n_subsets, fraction, seed=subset_seed)
    cache = None if out_dir is None else Path(out_dir) / f"drop-{fraction:g}-seed{seed}"
    return kept, retrain_outputs(train_fn, kept, out_dir=cache, progress=progress, seeds=[seed])


def single_model_lds(
    scores: torch.Tensor | np.ndarray,
    train_fn: TrainFn,
    n_train: int,
    *,
    fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.5),
    n_subsets: int = 100,
    seed: int = 0,
    subset_seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    output: str = "loss",
    progress: bool = True,
) -> dict[float, LDSResult]:
    """The LDS of scores [n_test, n_train] against single-model retraining, per drop fraction."""
    out = {}
    for fraction in fractions:
        kept, outputs = single_model_outputs(
            train_fn,
            n_train,
            fraction,
            n_subsets,
            seed=seed,
            subset_seed=subset_seed,
            out_dir=out_dir,
            progress=progress,
        )
        out[fraction] = lds(scores, kept, outputs, output=output)
    return out
