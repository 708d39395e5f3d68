"""Attribution with a proxy model: how much is lost when the gradients come from another model?

    .venv/bin/python examples/digits/proxy.py            # shares its retraining cache with lds.py

The target is the digits MLP 64-256-10 trained for 30 epochs on all 1,397 training images (as in
lds.py). Its test predictions are attributed with the gradients of:
- the full model itself;
- proxy MLPs with fewer hidden units (64, 16), trained on the same data in the same way;
- models not trained on the target data: the full architecture at initialisation (the same
  initial weights as the full model), after one epoch, and trained for 30 epochs on 300 other
  images (the test images that are not queried) instead of the training set.

Each model logs every training image's gradient in one attribution pass (random projection
r=64, sum-reduced loss) and the gradients of the 100 queried test images' losses *under that
model*; scores use the `identity` and `raw` (λ=0.1) preconditioners. All are judged against the
same ground truth: the full architecture retrained on M=100 random halves of the training set
(2 seeds each; the test losses of those retrained models), i.e. lds.py's retraining, whose cache
under out/lds/ both scripts share. Also reported: the Spearman correlation between a model's
scores and the full model's over the training images (per test image, then averaged) and the
overlap of their top-10 lists.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lds as lds_example
import torch
from common import HERE, accuracy, load_digits, retrained_test_losses, train_mlp
from rich.console import Console
from rich.table import Table

import logix
from logix.eval import bootstrap_ci, lds, spearman

console = Console()
if not console.is_terminal:
    console = Console(width=170)


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Fraction of each row's top-k (by a) also in the top-k by b: [n_test]."""
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)])


def mean_ci(values: torch.Tensor) -> str:
    low, high = bootstrap_ci(values)
    return f"{float(values.double().nanmean()):.3f} [{low:.3f}, {high:.3f}]"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subsets", type=int, default=100, help="M: retrained full models (half subsets)")
    p.add_argument("--seeds", type=int, default=2, help="training seeds averaged per subset")
    p.add_argument("--n-test", type=int, default=100, help="test images to attribute")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 16], help="proxy widths")
    p.add_argument("--rank", type=int, default=64, help="random projection rank per side")
    p.add_argument("--damping", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "out" / "lds",
        help="shared with lds.py: the retraining cache is reused",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    data = load_digits()
    x_test, y_test = data.x_test[: args.n_test], data.y_test[: args.n_test]
    other_x, other_y = data.x_test[args.n_test :], data.y_test[args.n_test :]  # never queried

    # 1. the attribution models --------------------------------------------------------------
    t = time.perf_counter()
    models = {"full model (hidden 256)": train_mlp(data.x_train, data.y_train, epochs=args.epochs, seed=0)}
    for h in args.hidden:
        models[f"proxy, hidden {h}"] = train_mlp(
            data.x_train, data.y_train, epochs=args.epochs, seed=0, hidden=h
        )
    models["full arch., at initialisation"] = train_mlp(data.x_train, data.y_train, epochs=0, seed=0)
    models["full arch., 1 epoch"] = train_mlp(data.x_train, data.y_train, epochs=1, seed=0)
    models[f"full arch., trained on {len(other_y)} other images"] = train_mlp(
        other_x, other_y, epochs=args.epochs, seed=0
    )
    timings["train attribution models"] = time.perf_counter() - t

    t = time.perf_counter()
    projection = {"kind": "random", "rank_in": args.rank, "rank_out": args.rank, "seed": 0}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    for i, (name, model) in enumerate(models.items()):
        path = args.out / "proxy-stores" / f"model-{i}"
        store = lds_example.log_store(path, model, data.x_train, data.y_train, projection)
        q = lds_example.query_gradients(path, model, x_test, y_test)
        scores[name] = {
            "identity": logix.InfluenceEngine(store, "identity").scores(q).values,
            "raw": logix.InfluenceEngine(store, "raw", damping=args.damping).scores(q).values,
        }
    timings["log + score"] = time.perf_counter() - t

    # 2. ground truth: retrained full models (lds.py's subsets, seeds and cache) -----------------
    t = time.perf_counter()
    subsets, outputs = retrained_test_losses(
        data, args.n_test, subsets=args.subsets, seeds=args.seeds, epochs=args.epochs, out_dir=args.out
    )
    timings[f"retrain {args.subsets}×{args.seeds} (cached ones skipped)"] = time.perf_counter() - t

    # 3. the table --------------------------------------------------------------------------
    reference = scores["full model (hidden 256)"]["raw"]
    table = Table(
        title=f"Attribution with proxy models, digits: {args.n_test} test images, ground truth = "
        f"full model retrained on M={args.subsets} halves × {args.seeds} seeds; mean [95% CI]"
    )
    for c in (
        "attribution model",
        "params",
        "acc (queried)",
        "LDS identity",
        f"LDS raw λ={args.damping:g}",
        "Spearman with full (raw)",
        "top-10 overlap",
    ):
        table.add_column(c, justify="left" if c == "attribution model" else "right")
    results = {}
    for name, model in models.items():
        s = scores[name]
        rho = spearman(s["raw"].T.double(), reference.T.double())  # per test image, over training images
        row = {
            "identity": lds(s["identity"], subsets, outputs),
            "raw": lds(s["raw"], subsets, outputs),
            "spearman": rho,
            "overlap": top_overlap(s["raw"], reference),
        }
        results[name] = row
        table.add_row(
            name,
            f"{parameters(model):,}",
            f"{accuracy(model, x_test, y_test):.3f}",
            lds_example.lds_cell(row["identity"]),
            lds_example.lds_cell(row["raw"]),
            mean_ci(rho),
            mean_ci(row["overlap"]),
        )
    console.print(table)
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return {"results": results, "scores": scores}


if __name__ == "__main__":
    main()
