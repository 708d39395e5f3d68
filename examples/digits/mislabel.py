"""Find flipped labels with self-influence: the mislabel-detection check on digits.

    .venv/bin/python examples/digits/mislabel.py            # 5% of labels flipped, seed 0

Flip 5% of the training labels (each to a different, random class), train the MLP on the noisy
labels, log every training example's gradient at the final checkpoint (attribution pass, random
projection r=64), and rank the training examples by how suspicious they look:

- self-influence I(z, z) = g̃ᵀ(F + λI)⁻¹g̃ with the `identity` and `raw` preconditioners (also
  on the last layer alone); a mislabelled example is one the model can only fit by pulling its
  weights hard in its own direction, so its self-influence is high;
- harm to clean held-out data: −Σ_q I(q, z) over the 400 test images (whose labels are clean),
  in the engine's `dot`, `relative` and `cosine` modes; this one needs clean data;
- baselines: the training loss of the final model, and random order (expected values).

Reported: precision and recall of the flipped examples among the top 5% and top 10%, and the
AUC of the whole ranking.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import HERE, accuracy, load_digits, train_mlp
from rich.console import Console
from rich.table import Table

import logix
from logix.eval import rankdata

console = Console()
if not console.is_terminal:
    console = Console(width=150)


def flip_labels(
    y: torch.Tensor, fraction: float, seed: int, n_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy labels [N], flipped [N] bool): round(fraction·N) labels moved to another class."""
    gen = torch.Generator().manual_seed(seed)
    n_flip = int(round(fraction * len(y)))
    idx = torch.randperm(len(y), generator=gen)[:n_flip]
    noisy = y.clone()
    noisy[idx] = (y[idx] + torch.randint(1, n_classes, (n_flip,), generator=gen)) % n_classes
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[idx] = True
    return noisy, flipped


def detection(suspicion: torch.Tensor, flipped: torch.Tensor, fractions: list[float]) -> list[float]:
    """[precision@f, recall@f for each f in fractions] + [AUC] of ranking by `suspicion` (high
    first; ties broken by row order)."""
    n, n_pos = len(flipped), int(flipped.sum())
    order = torch.sort(suspicion, descending=True, stable=True).indices
    out = []
    for f in fractions:
        k = int(round(f * n))
        hits = int(flipped[order[:k]].sum())
        out += [hits / k, hits / n_pos]
    ranks = rankdata(suspicion)  # AUC = P(a flipped example outranks a clean one), ties count ½
    auc = (float(ranks[flipped].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))
    return out + [auc]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fraction", type=float, default=0.05, help="fraction of labels flipped")
    p.add_argument("--seed", type=int, default=0, help="seed of the flips")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rank", type=int, default=64, help="projection rank (rank_in = rank_out)")
    p.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "out" / "mislabel")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    data = load_digits()
    y_noisy, flipped = flip_labels(data.y_train, args.fraction, args.seed)
    t = time.perf_counter()
    model = train_mlp(data.x_train, y_noisy, epochs=args.epochs, seed=0)
    timings["train"] = time.perf_counter() - t
    with torch.no_grad():
        train_loss = F.cross_entropy(model(data.x_train), y_noisy, reduction="none")
        fits = model(data.x_train).argmax(1) == y_noisy
    console.print(
        f"{int(flipped.sum())} of {len(y_noisy)} labels flipped; the model fits "
        f"{float(fits[flipped].float().mean()):.0%} of the flipped and "
        f"{float(fits[~flipped].float().mean()):.0%} of the clean labels; "
        f"test acc {accuracy(model, data.x_test, data.y_test):.3f}"
    )

    # The attribution pass, with the labels the model was trained on.
    t = time.perf_counter()
    path = args.out / "store"
    config = {
        "projection": {"kind": "random", "rank_in": args.rank, "rank_out": args.rank, "seed": 0},
        "capture": {"attribution_only": True, "loss_reduction": "sum"},
    }
    run = logix.init(path, config=config, overwrite=True)
    run.watch(model)
    for start in range(0, len(y_noisy), 256):
        ids = list(range(start, min(start + 256, len(y_noisy))))
        with run(data_id=ids):
            F.cross_entropy(model(data.x_train[ids]), y_noisy[ids], reduction="sum").backward()
    run.finalize()
    query = logix.init(path, mode="query")
    query.watch(model)
    with query(data_id=[f"test-{i}" for i in range(len(data.y_test))]):
        F.cross_entropy(model(data.x_test), data.y_test, reduction="sum").backward()
    q = query.gradients()
    store = logix.open_store(path)
    timings["log"] = time.perf_counter() - t

    t = time.perf_counter()
    rankings: dict[str, tuple[str, torch.Tensor]] = {}
    rankings["random order (expected)"] = ("baseline", torch.zeros(0))
    rankings["training loss"] = ("baseline", train_loss)
    engines = {"identity": logix.InfluenceEngine(store, preconditioner="identity")}
    for d in args.dampings:
        engines[f"raw λ={d:g}"] = logix.InfluenceEngine(store, preconditioner="raw", damping=d)
    for name, engine in engines.items():
        rankings[f"self-influence, {name}"] = ("self", engine.self_influence().values)
    last = store.modules[-1].name
    rankings[f"self-influence, raw λ=0.1, last layer ({last}) only"] = (
        "self",
        logix.InfluenceEngine(store, preconditioner="raw", damping=0.1, modules=[last])
        .self_influence()
        .values,
    )
    for mode in ("dot", "relative", "cosine"):
        for name in ("identity", "raw λ=0.1"):
            if name in engines:
                harm = -engines[name].scores(q, mode=mode).values.sum(dim=0)
                rankings[f"harm to clean test set, {name}, {mode}"] = ("held-out", harm)
    timings["score"] = time.perf_counter() - t

    fractions = [0.05, 0.10]
    table = Table(
        title=f"Mislabel detection on digits: {int(flipped.sum())} of {len(flipped)} training "
        f"labels flipped (seed {args.seed}), projection r={args.rank}"
    )
    table.add_column("ranking")
    table.add_column("uses")
    for f in fractions:
        table.add_column(f"precision@{f:.0%}", justify="right")
        table.add_column(f"recall@{f:.0%}", justify="right")
    table.add_column("AUC", justify="right")
    base = float(flipped.float().mean())
    for name, (uses, suspicion) in rankings.items():
        if suspicion.numel() == 0:  # random order: expected values
            values = sum(([base, f] for f in fractions), []) + [0.5]
        else:
            values = detection(suspicion, flipped, fractions)
        table.add_row(name, uses, *[f"{v:.3f}" for v in values])
    console.print(table)
    timings["total"] = time.perf_counter() - t_all
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
