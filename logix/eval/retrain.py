"""Random training subsets for the LDS, and the outputs of models retrained on them (cached per subset)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from logix.store.format import write_atomic
from logix.store.tagged import read_tagged

TrainFn = Callable[[torch.Tensor, int], torch.Tensor]
_CACHE_FORMAT = "logix-lds-output"


# ------------------------------------------------------------------------------ subsets
def sample_subsets(n_train: int, n_subsets: int, alpha: float = 0.5, seed: int = 0) -> torch.Tensor:
    """M random subsets of the training set, each of exactly round(alpha · n_train) members.

    Returns a bool tensor [n_subsets, n_train]; row j marks the members of subset j. The same
    (n_train, n_subsets, alpha, seed) always give the same subsets, and the first rows do not
    depend on n_subsets (asking for more subsets later extends the earlier ones).
    """
    if n_train < 1:
        raise ValueError(f"n_train must be at least 1, got {n_train}")
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be at least 1, got {n_subsets}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    size = int(round(alpha * n_train))
    if not 0 < size < n_train:
        raise ValueError(
            f"alpha={alpha} gives subsets of {size} of {n_train} examples; "
            "each subset must keep some examples and leave some out"
        )
    gen = torch.Generator().manual_seed(int(seed))
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for j in range(n_subsets):  # one permutation per row: row j never depends on n_subsets
        masks[j, torch.randperm(n_train, generator=gen)[:size]] = True
    return masks


# ------------------------------------------------------------------------------ retraining
def _cache_path(out_dir: Path, j: int) -> Path:
    return out_dir / f"subset-{j:05d}.safetensors"


def _read_cached(path: Path, members: torch.Tensor, seeds: list[int]) -> torch.Tensor | None:
    """The cached output [n_test] of one subset, None if absent; an error if it is for other
    members or seeds (a stale cache must not be mixed into a new evaluation)."""
    if not path.exists():
        return None
    tensors, md = read_tagged(
        path, _CACHE_FORMAT, "a logix LDS output file", "remove it or use another out_dir", error=ValueError
    )
    stored_members, output = tensors["members"], tensors["output"]
    if not torch.equal(stored_members, members) or json.loads(md.get("seeds", "null")) != seeds:
        raise ValueError(
            f"{path} holds the output of a different subset or seeds than asked for now: the "
            "cache in this out_dir belongs to another evaluation; use a new out_dir or delete it"
        )
    return output


def _write_cached(path: Path, members: torch.Tensor, seeds: list[int], output: torch.Tensor) -> None:
    """Write atomically: a run killed mid-write leaves no half file to be trusted later."""
    tensors = {"members": members.contiguous(), "output": output.contiguous()}
    metadata = {"format": _CACHE_FORMAT, "seeds": json.dumps(seeds)}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def retrain_outputs(
    train_fn: TrainFn,
    subsets: torch.Tensor,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    seeds: Sequence[int] = (0,),
) -> torch.Tensor:
    """Retrain on every subset and collect the measured outputs: [M, n_test] float32.

    train_fn(subset_indices, seed) -> [n_test]: trains a model on the training examples
    `subset_indices` (int64 [k], sorted) with random seed `seed` and returns its output on every
    test example (e.g. the test losses). With several `seeds`, each subset is trained once per
    seed and the outputs are averaged; the same seeds serve every subset, so that differences
    between subsets come from the data rather than from the initialisation.

    With `out_dir`, each subset's averaged output is saved as `subset-<j>.safetensors` (with the
    subset's members and the seeds, to recognise a stale cache) as soon as it is computed, and
    subsets already there are not retrained: an interrupted evaluation resumes where it stopped.
    """
    subsets = torch.as_tensor(subsets).to(torch.bool)
    if subsets.ndim != 2:
        raise ValueError(f"subsets must be [n_subsets, n_train] booleans, got shape {tuple(subsets.shape)}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one training seed")
    cache = Path(out_dir) if out_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)

    rows: list[torch.Tensor | None] = [None] * subsets.shape[0]
    todo = []
    for j in range(subsets.shape[0]):
        cached = _read_cached(_cache_path(cache, j), subsets[j], seeds) if cache is not None else None
        if cached is None:
            todo.append(j)
        else:
            rows[j] = cached

    def compute(j: int) -> torch.Tensor:
        members = subsets[j].nonzero().flatten()
        outs = []
        for seed in seeds:
            out = torch.as_tensor(train_fn(members, seed)).detach().to("cpu", torch.float32).flatten()
            outs.append(out)
        if any(o.shape != outs[0].shape for o in outs):
            raise ValueError(f"train_fn returned outputs of different lengths for subset {j}")
        mean = torch.stack(outs).mean(dim=0)
        if cache is not None:
            _write_cached(_cache_path(cache, j), subsets[j], seeds, mean)
        return mean

    if todo and progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("retraining"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task("retrain", total=len(todo))
            for j in todo:
                rows[j] = compute(j)
                bar.advance(task)
    else:
        for j in todo:
            rows[j] = compute(j)

    lengths = {r.numel() for r in rows}
    if len(lengths) > 1:
        raise ValueError(
            f"the outputs of different subsets have different lengths {sorted(lengths)}: "
            "train_fn must measure the same test examples every time"
        )
    return torch.stack(rows)
