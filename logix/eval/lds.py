"""The linear datamodeling score (LDS): how well attribution scores predict retraining.

For M random subsets S_j of the training set (each a fraction `alpha` of it), retrain the model
on S_j and measure an output on every test example q (its loss, its margin, ...). The scores
predict that output additively: `pred[j, q] = Σ_{z ∈ S_j} score[q, z]`. The LDS of q is the
Spearman rank correlation, over the M subsets, between `pred[:, q]` and the measured output;
the LDS of a method is the mean over test examples.

Sign convention. logix scores are positive when a training example *helps* the query (lowers
its loss). With `output="loss"` (the default) the measured output is a loss, so a larger
predicted help must mean a *lower* output: the correlation is taken with `-output`. With
`output="score"` the measured output already grows when training helps (a margin, a
log-probability, an accuracy) and is used as it is. A perfect method has LDS 1 either way.

The three pieces are independent:

    subsets = sample_subsets(n_train, n_subsets=100, alpha=0.5, seed=0)   # [M, n_train] bool
    outputs = retrain_outputs(train_fn, subsets, out_dir="out/lds")       # [M, n_test]
    result = lds(scores, subsets, outputs, output="loss")                 # LDSResult
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from logix.store.format import write_atomic
from logix.store.tagged import read_tagged

OUTPUT_KINDS = ("loss", "score")
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


# ------------------------------------------------------------------------------ statistics
def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given the average of the ranks they span: [n] float64.

    rankdata([10, 20, 20, 5]) = [2, 3.5, 3.5, 1].
    """
    x = torch.as_tensor(x)
    if x.ndim != 1:
        raise ValueError(f"rankdata takes a 1-D tensor, got shape {tuple(x.shape)}")
    n = x.numel()
    order = torch.argsort(x, stable=True)
    xs = x[order]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = xs[1:] != xs[:-1]
    group = torch.cumsum(starts.long(), dim=0) - 1  # group index of each sorted position
    positions = torch.arange(1, n + 1, dtype=torch.float64)
    n_groups = int(group[-1]) + 1 if n else 0
    total = torch.zeros(n_groups, dtype=torch.float64).scatter_add_(0, group, positions)
    count = torch.bincount(group, minlength=n_groups).to(torch.float64)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = (total / count)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of the columns of a and b: [M, k] × [M, k] -> [k] float64.

    The Pearson correlation of the average ranks (ties handled as in `rankdata`); NaN for a
    column where either side is constant (the correlation is undefined there). 1-D inputs are
    treated as one column and give a 0-D result.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    one = a.ndim == 1
    if one:
        a, b = a[:, None], b[:, None]
    ra = torch.stack([rankdata(a[:, i]) for i in range(a.shape[1])], dim=1)
    rb = torch.stack([rankdata(b[:, i]) for i in range(b.shape[1])], dim=1)
    ra = ra - ra.mean(dim=0)
    rb = rb - rb.mean(dim=0)
    denom = (ra.square().sum(dim=0) * rb.square().sum(dim=0)).sqrt()
    rho = torch.where(denom > 0, (ra * rb).sum(dim=0) / denom, torch.full_like(denom, float("nan")))
    return rho[0] if one else rho


@dataclass
class LDSResult:
    """The LDS of one set of scores.

    mean: mean Spearman correlation over the valid test examples; ci_low / ci_high: the
    `level` confidence interval of that mean over test examples (percentile bootstrap);
    per_test: [n_test] float64, NaN where undefined (constant predictions or outputs);
    n_valid: test examples with a defined correlation; n_subsets: M.

    The interval reflects the choice of test examples only, not the retraining noise in the
    measured outputs (average several seeds per subset to shrink that).
    """

    mean: float
    ci_low: float
    ci_high: float
    per_test: torch.Tensor
    n_valid: int
    n_subsets: int
    output: str
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def bootstrap_ci(
    values: torch.Tensor, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` [n] (NaNs dropped)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    if v.numel() == 1:
        return float(v[0]), float(v[0])
    gen = torch.Generator().manual_seed(int(seed))
    means = v[torch.randint(0, v.numel(), (n_boot, v.numel()), generator=gen)].mean(dim=1)
    tail = (1.0 - level) / 2.0
    q = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(q[0]), float(q[1])


def lds(
    scores: torch.Tensor | np.ndarray,
    subsets: torch.Tensor | np.ndarray,
    outputs: torch.Tensor | np.ndarray,
    *,
    output: str = "loss",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> LDSResult:
    """The linear datamodeling score of `scores` against retraining results.

    scores [n_test, n_train] (positive = helps the test example, logix's convention);
    subsets [M, n_train] bool (from `sample_subsets`); outputs [M, n_test] (from
    `retrain_outputs`). output: "loss" if the outputs fall when training helps (they are
    negated before correlating), "score" if they rise. Returns an `LDSResult` whose per-test
    values are the Spearman correlations over the M subsets between `subsets @ scores.T` and
    the (signed) outputs.
    """
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    scores = torch.as_tensor(scores).to(torch.float64)
    subsets = torch.as_tensor(subsets).to(torch.bool)
    outputs = torch.as_tensor(outputs).to(torch.float64)
    if scores.ndim != 2 or subsets.ndim != 2 or outputs.ndim != 2:
        raise ValueError(
            "scores [n_test, n_train], subsets [M, n_train] and outputs [M, n_test] must all be 2-D"
        )
    n_test, n_train = scores.shape
    if subsets.shape[1] != n_train:
        raise ValueError(f"subsets cover {subsets.shape[1]} training examples, scores {n_train}")
    if outputs.shape != (subsets.shape[0], n_test):
        raise ValueError(
            f"outputs must be [M={subsets.shape[0]}, n_test={n_test}], got {tuple(outputs.shape)}"
        )
    if subsets.shape[0] < 3:
        raise ValueError("a rank correlation needs at least 3 subsets")
    predicted = subsets.to(torch.float64) @ scores.T  # [M, n_test]
    target = -outputs if output == "loss" else outputs
    per_test = spearman(predicted, target)
    valid = per_test[~torch.isnan(per_test)]
    mean = float(valid.mean()) if valid.numel() else float("nan")
    low, high = bootstrap_ci(per_test, level=level, n_boot=n_boot, seed=seed)
    return LDSResult(mean, low, high, per_test, int(valid.numel()), int(subsets.shape[0]), output, level)
