"""Two-stage training on digits: does segment-aware attribution beat single-checkpoint influence?

    .venv/bin/python examples/digits/two_stage.py                      # stage 2 relabels the digits
    .venv/bin/python examples/digits/two_stage.py --task same          # stage 2 continues the task

The pipeline (one MLP 64-256-10, SGD with momentum 0.9, a fresh optimizer per stage):
- stage 1, pre-training: the first 1,197 training images with their digit labels;
- stage 2, fine-tuning: the other 200 images, with a shifted label set (`--task shifted`: each
  digit is labelled as the next one, d -> d+1 mod 10) or the same labels (`--task same`).
The test measurement is the loss of the final model on 100 test images under stage 2's labels.

Logging: each stage is split into `--segments` segments of equal length; at each segment's
middle, one attribution pass logs that stage's examples into a segment of the store (meta: lr,
momentum, steps, examples) and the test gradients at that checkpoint are captured (TracIn-CP).
After training, two more segments hold gradients at the final model: the stage-2 examples
(`final-s2`) and all examples with their own stage's labels (`final-all`).

Scores (columns: the 1,197 stage-1 examples, then the 200 stage-2 examples):
- influence at the final model, with that segment's raw curvature: `final-s2` (stage-1
  examples score 0) and `final-all` (the single-checkpoint view of the whole pipeline);
- TracIn-CP: `combined_scores` over the stage segments, each weighted by η_eff·K/N (its
  effective learning rate times its steps over its examples), queries at each checkpoint;
- SOURCE: `stagewise_scores` over the stage segments, queries at the final model.

Ground truth, two resampling schemes (M subsets × seeds, retrained from scratch; cached):
- (a) stage 2 resampled: stage 1 keeps all its data (the pre-trained model of each seed is
  trained once); fine-tuning uses a random half of the 200 stage-2 examples. LDS over the
  stage-2 columns.
- (b) both resampled: each subset keeps a random half of the stage-1 examples and a random half
  of the stage-2 examples (drawn independently, so stage sizes are fixed); both stages are
  retrained. LDS over all columns.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import HERE, load_digits, make_mlp
from rich.console import Console
from rich.table import Table
from torch import nn

import logix
from logix.eval import bootstrap_ci, lds, retrain_outputs, sample_subsets

console = Console()
if not console.is_terminal:
    console = Console(width=160)

MOMENTUM = 0.9


@dataclass
class Setup:
    """The two-stage pipeline; everything that changes the trained models."""

    task: str = "shifted"  # shifted | same: stage 2's labels
    n_stage2: int = 200
    epochs1: int = 20
    epochs2: int = 30
    lr1: float = 0.1
    lr2: float = 0.02
    batch_size: int = 64
    segments: int = 2  # per stage (logging only: the trained models do not depend on it)

    def key(self) -> str:
        """Identifies the trained models (for the retraining cache)."""
        fields = {k: v for k, v in asdict(self).items() if k != "segments"}
        return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=6).hexdigest()


@dataclass
class Pools:
    x1: torch.Tensor  # [N1, 64] stage-1 images
    y1: torch.Tensor  # [N1] their digit labels
    x2: torch.Tensor  # [N2, 64] stage-2 images
    y2: torch.Tensor  # [N2] stage-2 labels
    x_test: torch.Tensor  # [n_test, 64]
    y_test: torch.Tensor  # [n_test] stage-2 labels


def stage2_labels(y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "shifted":
        return (y + 1) % 10
    if task == "same":
        return y
    raise ValueError(f"task must be 'shifted' or 'same', got {task!r}")


def make_pools(setup: Setup, n_test: int) -> Pools:
    d = load_digits()
    n1 = len(d.y_train) - setup.n_stage2
    return Pools(
        d.x_train[:n1],
        d.y_train[:n1],
        d.x_train[n1:],
        stage2_labels(d.y_train[n1:], setup.task),
        d.x_test[:n_test],
        stage2_labels(d.y_test[:n_test], setup.task),
    )


def segment_bounds(epochs: int, segments: int) -> list[tuple[int, int]]:
    """[start, end) epochs of each segment of a stage (as equal as possible)."""
    if not 1 <= segments <= epochs:
        raise ValueError(f"segments per stage must be in [1, {epochs}], got {segments}")
    edges = np.linspace(0, epochs, segments + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


OnSegment = Callable[[str, nn.Module, dict], None]


def train_stage(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    setup: Setup,
    prefix: str,
    on_segment: OnSegment | None = None,
) -> nn.Module:
    """SGD (momentum 0.9, weight decay 1e-4, fresh optimizer) on (x, y); `on_segment(name,
    model, meta)` is called at the middle of each segment, before that epoch's steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(y) // setup.batch_size)
    middles = {}
    for k, (a, b) in enumerate(segment_bounds(epochs, setup.segments)):
        middles[a + (b - a) // 2] = (
            f"{prefix}-{k}",
            {
                "lr": lr,
                "momentum": MOMENTUM,
                "steps": (b - a) * steps_per_epoch,
                "examples": len(y),
                "epochs": [a, b],
            },
        )
    for epoch in range(epochs):
        if on_segment is not None and epoch in middles:
            on_segment(*middles[epoch][:1], model, middles[epoch][1])
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), setup.batch_size):
            idx = order[start : start + setup.batch_size]
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    return model


def pretrain(
    pools: Pools,
    setup: Setup,
    seed: int,
    members1: torch.Tensor | None = None,
    on_segment: OnSegment | None = None,
) -> nn.Module:
    x1, y1 = (pools.x1, pools.y1) if members1 is None else (pools.x1[members1], pools.y1[members1])
    return train_stage(
        make_mlp(seed),
        x1,
        y1,
        epochs=setup.epochs1,
        lr=setup.lr1,
        seed=seed + 1,
        setup=setup,
        prefix="s1",
        on_segment=on_segment,
    )


def finetune(
    model: nn.Module,
    pools: Pools,
    setup: Setup,
    seed: int,
    members2: torch.Tensor | None = None,
    on_segment: OnSegment | None = None,
) -> nn.Module:
    x2, y2 = (pools.x2, pools.y2) if members2 is None else (pools.x2[members2], pools.y2[members2])
    return train_stage(
        model,
        x2,
        y2,
        epochs=setup.epochs2,
        lr=setup.lr2,
        seed=seed + 2,
        setup=setup,
        prefix="s2",
        on_segment=on_segment,
    )


def test_losses(model: nn.Module, pools: Pools) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(pools.x_test), pools.y_test, reduction="none")


# ------------------------------------------------------------------------------ logging
class Logger:
    """One store for the whole pipeline: attribution passes into segments, query gradients."""

    def __init__(self, path: Path, model: nn.Module, pools: Pools, rank: int):
        config = {
            "projection": {"kind": "random", "rank_in": rank, "rank_out": rank, "seed": 0},
            "capture": {"attribution_only": True, "loss_reduction": "sum"},
            "curvature": {"statistics": ["raw"]},
        }
        self.path, self.pools = path, pools
        self.ids1 = [f"s1:{i}" for i in range(len(pools.y1))]
        self.ids2 = [f"s2:{i}" for i in range(len(pools.y2))]
        self.run = logix.init(path, config=config, overwrite=True)
        self.run.watch(model)
        self.queries: dict[str, logix.Gradients] = {}

    def log(
        self,
        name: str,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        ids: list,
        meta: dict | None = None,
        batch: int = 256,
    ) -> None:
        self.run.start_segment(name, **(meta or {}))
        for start in range(0, len(y), batch):
            with self.run(data_id=ids[start : start + batch]):
                F.cross_entropy(
                    model(x[start : start + batch]), y[start : start + batch], reduction="sum"
                ).backward()
        self.run.flush()
        self.queries[name] = self.query(model)

    def query(self, model: nn.Module) -> logix.Gradients:
        q = logix.init(self.path, mode="query")
        q.watch(model)
        with q(data_id=list(range(len(self.pools.y_test)))):
            F.cross_entropy(model(self.pools.x_test), self.pools.y_test, reduction="sum").backward()
        model.zero_grad()
        return q.gradients()

    def on_segment(self, name: str, model: nn.Module, meta: dict) -> None:
        x, y, ids = (
            (self.pools.x1, self.pools.y1, self.ids1)
            if name.startswith("s1")
            else (self.pools.x2, self.pools.y2, self.ids2)
        )
        self.log(name, model, x, y, ids, meta)


def attribute(
    pools: Pools, setup: Setup, path: Path, rank: int, dampings: list[float]
) -> tuple[dict, list, nn.Module]:
    """Train the full pipeline while logging: (every method's scores [n_test, N1 + N2] by method
    name, the column ids, the final model)."""
    model = make_mlp(0)
    logger = Logger(path, model, pools, rank)
    # the same pipeline as pretrain(pools, setup, 0) then finetune(..., 0), logged on the way
    train_stage(
        model,
        pools.x1,
        pools.y1,
        epochs=setup.epochs1,
        lr=setup.lr1,
        seed=1,
        setup=setup,
        prefix="s1",
        on_segment=logger.on_segment,
    )
    finetune(model, pools, setup, seed=0, on_segment=logger.on_segment)
    logger.log("final-s2", model, pools.x2, pools.y2, logger.ids2)
    logger.log(
        "final-all",
        model,
        torch.cat([pools.x1, pools.x2]),
        torch.cat([pools.y1, pools.y2]),
        logger.ids1 + logger.ids2,
    )
    logger.run.finalize()

    store = logix.open_store(path)
    ids = logger.ids1 + logger.ids2
    column = {t: j for j, t in enumerate(ids)}
    final_q = logger.queries["final-all"]
    stages = [s for s in store.segments if s.startswith(("s1-", "s2-"))]

    def aligned(result) -> torch.Tensor:
        out = torch.zeros(len(final_q), len(ids), dtype=torch.float64)
        out[:, [column[t] for t in result.train_ids]] = result.values.double()
        return out

    scores = {}
    for d in dampings:
        for seg in ("final-s2", "final-all"):
            engine = logix.InfluenceEngine(store.select(seg), preconditioner="raw", damping=d)
            scores[f"influence, {seg} λ={d:g}"] = aligned(engine.scores(final_q))
        scores[f"SOURCE λ={d:g}"] = aligned(logix.stagewise_scores(store, final_q, stages, damping=d))
    weights = {}
    for s in stages:
        meta = store.select(s).segment_meta
        weights[s] = meta["lr"] / (1 - meta["momentum"]) * meta["steps"] / meta["examples"]
    scores["TracIn-CP (η_eff·K/N)"] = aligned(
        logix.combined_scores(
            store,
            {s: logger.queries[s] for s in stages},
            preconditioner="identity",
            weights=weights,
            missing="zero",
        )
    )
    scores["TracIn-CP (lr)"] = aligned(
        logix.combined_scores(
            store, {s: logger.queries[s] for s in stages}, preconditioner="identity", missing="zero"
        )
    )
    return scores, ids, model


# ------------------------------------------------------------------------------ ground truth
def ground_truth(
    pools: Pools, setup: Setup, scheme: str, n_subsets: int, seeds: list[int], out: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """(subsets [M, N1 + N2] bool, outputs [M, n_test] test losses) of one resampling scheme."""
    n1, n2 = len(pools.y1), len(pools.y2)
    half2 = sample_subsets(n2, n_subsets, alpha=0.5, seed=2)
    if scheme == "stage2":
        subsets = torch.cat([torch.ones(n_subsets, n1, dtype=torch.bool), half2], dim=1)
        pretrained = {}

        def train_fn(members: torch.Tensor, seed: int) -> torch.Tensor:
            if seed not in pretrained:
                pretrained[seed] = {
                    k: v.clone() for k, v in pretrain(pools, setup, seed).state_dict().items()
                }
            model = make_mlp(seed)
            model.load_state_dict(pretrained[seed])
            return test_losses(finetune(model, pools, setup, seed, members[members >= n1] - n1), pools)
    elif scheme == "both":
        subsets = torch.cat([sample_subsets(n1, n_subsets, alpha=0.5, seed=1), half2], dim=1)

        def train_fn(members: torch.Tensor, seed: int) -> torch.Tensor:
            model = pretrain(pools, setup, seed, members[members < n1])
            return test_losses(finetune(model, pools, setup, seed, members[members >= n1] - n1), pools)
    else:
        raise ValueError(scheme)
    cache = out / f"retrain-{setup.key()}-{scheme}-test{len(pools.y_test)}"
    return subsets, retrain_outputs(train_fn, subsets, out_dir=cache, seeds=seeds)


def cell(r) -> str:
    return f"{r.mean:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"


def paired_gap(a, b) -> str:
    gap = a.per_test - b.per_test
    low, high = bootstrap_ci(gap)
    return f"{float(gap.nanmean()):+.3f} [{low:+.3f}, {high:+.3f}]"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["shifted", "same"], default="shifted")
    p.add_argument("--subsets", type=int, default=100, help="M: retrained pipelines per scheme")
    p.add_argument("--seeds", type=int, default=2, help="training seeds averaged per subset")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-stage2", type=int, default=200)
    p.add_argument("--epochs1", type=int, default=20)
    p.add_argument("--epochs2", type=int, default=30)
    p.add_argument("--segments", type=int, default=2, help="segments per stage")
    p.add_argument("--rank", type=int, default=32, help="random projection rank per side")
    p.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--schemes", nargs="+", default=["stage2", "both"], choices=["stage2", "both"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "out" / "two_stage")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = Setup(
        task=args.task,
        n_stage2=args.n_stage2,
        epochs1=args.epochs1,
        epochs2=args.epochs2,
        segments=args.segments,
    )
    pools = make_pools(setup, args.n_test)
    timings = {}

    t = time.perf_counter()
    scores, ids, full = attribute(
        pools, setup, args.out / f"store-{setup.key()}-seg{setup.segments}", args.rank, args.dampings
    )
    timings["train + log + score"] = time.perf_counter() - t
    with torch.no_grad():
        acc = (full(pools.x_test).argmax(1) == pools.y_test).float().mean().item()
    console.print(
        f"task {setup.task}: stage 1 {len(pools.y1)} images × {setup.epochs1} epochs (lr {setup.lr1}), "
        f"stage 2 {len(pools.y2)} × {setup.epochs2} (lr {setup.lr2}), {setup.segments} segments per "
        f"stage; final test accuracy (stage-2 labels) {acc:.3f}"
    )

    n1 = len(pools.y1)
    d = 0.1 if 0.1 in args.dampings else args.dampings[0]
    source = scores[f"SOURCE λ={d:g}"]
    # Which stage's scores carry the signal: SOURCE with the other stage's columns zeroed.
    scores[f"SOURCE λ={d:g}, stage-2 columns only"] = torch.cat([0 * source[:, :n1], source[:, n1:]], 1)
    scores[f"SOURCE λ={d:g}, stage-1 columns only"] = torch.cat([source[:, :n1], 0 * source[:, n1:]], 1)
    results: dict[str, dict] = {name: {} for name in scores}
    for scheme in args.schemes:
        t = time.perf_counter()
        subsets, outputs = ground_truth(pools, setup, scheme, args.subsets, list(range(args.seeds)), args.out)
        timings[f"retrain {scheme}"] = time.perf_counter() - t
        columns = slice(n1, None) if scheme == "stage2" else slice(None)
        for name, s in scores.items():
            results[name][scheme] = lds(s[:, columns], subsets[:, columns], outputs, output="loss")

    table = Table(
        title=f"LDS, two-stage digits ({setup.task} labels in stage 2): {args.n_test} test images, "
        f"M={args.subsets} × {args.seeds} seeds, mean Spearman [95% bootstrap CI]"
    )
    table.add_column("method")
    for scheme in args.schemes:
        table.add_column(
            {"stage2": "(a) stage 2 resampled", "both": "(b) both resampled"}[scheme], justify="right"
        )
    for name, row in results.items():
        table.add_row(name, *[cell(row[s]) if row[s].n_valid else "—" for s in args.schemes])
    console.print(table)
    # SOURCE at λ=0.1 against each baseline at its best damping for that scheme (chosen with
    # hindsight on these test images: it favours the baselines)
    for scheme in args.schemes:
        src = results[f"SOURCE λ={d:g}"][scheme]
        for family in ("influence, final-s2", "influence, final-all", "TracIn-CP (η_eff·K/N)"):
            names = [n for n in results if n.startswith(family)]
            best = max(names, key=lambda n: results[n][scheme].mean)
            console.print(
                f"({scheme}) SOURCE λ={d:g} − {best}: {paired_gap(src, results[best][scheme])} "
                "(paired over test images)"
            )
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return {"results": results, "scores": scores, "ids": ids}


if __name__ == "__main__":
    main()
