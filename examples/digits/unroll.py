"""Exact attribution through the recorded digits training (metagradients by replay), against
influence functions, on single-model and multi-seed LDS.

    .venv/bin/python examples/digits/unroll.py --retrain-only   # fill the retraining caches first
    .venv/bin/python examples/digits/unroll.py                  # record, replay, evaluate
    .venv/bin/python examples/digits/unroll.py --lr 0.03        # the same with a gentler step size

1. Train the MLP of common.py (SGD, momentum 0.9, 30 epochs, 660 steps) with each seed of
   --seeds while `logix.record_trajectory` records it (no rows logged); the recording's cost
   per step is measured against plain training (ratios within one run).
2. `logix.unroll` replays each trajectory and returns, for the first --n-test test images, the
   exact derivative of the test loss with respect to a weight on every training example.
3. Ground truths: single-model (seed 0, its batch order, dropped examples weighted 0; --subsets
   per drop fraction, cached under out/unroll/) and multi-seed (lds.py's random halves × seeds,
   sharing its cache under out/lds/). Influence: exact full-parameter Gauss-Newton influence
   (the best setting of lds.py) and exact empirical-Fisher influence on the seed-0 model.
   The ground truth's test losses are computed from float64 logits (float32 rounds confident
   losses, ~1e-7 and below, to ties).
4. Smoothness: a float64 recording of seed 0; central finite differences of the whole training
   in one example's weight, at steps 1e-1 … 1e-6, against the replayed derivative.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch
import torch.nn.functional as F
from common import HERE, load_digits, make_mlp, retrained_test_losses
from rich.console import Console
from rich.table import Table

import logix
from logix.eval import drop_subsets, lds, single_model_outputs

console = Console(width=150)
BATCH, LR = 64, 0.1


def train_weighted(
    data,
    weights: torch.Tensor | None,
    seed: int,
    epochs: int,
    recorder=None,
    dtype=torch.float32,
    lr: float = LR,
):
    """common.train_mlp's recipe (same init, batch order and optimizer) with a loss weight per
    training example (dropped ones 0, kept in the batches); `recorder` records the trajectory."""
    x, y = data.x_train.to(dtype), data.y_train
    w = torch.ones(len(y), dtype=dtype) if weights is None else weights.to(dtype)
    model = make_mlp(seed).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    if recorder is not None:
        recorder = recorder(model, opt)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), BATCH):
            idx = order[start : start + BATCH]
            with recorder(data_id=idx.tolist()) if recorder is not None else contextlib.nullcontext():
                (w[idx] * F.cross_entropy(model(x[idx]), y[idx], reduction="none")).mean().backward()
            opt.step()
            opt.zero_grad()
    if recorder is not None:
        recorder.close()
    return model


def test_losses(model, data, n_test: int) -> torch.Tensor:
    """[n_test] cross-entropy of the first test images, from float64 logits: in float32 a loss
    below ~1e-7 (a confident prediction) rounds to 0 or to a few steps of 6e-8, which would turn
    the small changes the ground truth measures into ties and rounding noise."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        logits = model(data.x_test[:n_test].to(dtype)).double()
        return F.cross_entropy(logits, data.y_test[:n_test], reduction="none")


def single_truth(data, args, fraction: float):
    def train_fn(kept: torch.Tensor, seed: int) -> torch.Tensor:
        w = torch.zeros(len(data.y_train))
        w[kept] = 1.0
        return test_losses(train_weighted(data, w, seed, args.epochs, lr=args.lr), data, args.n_test)

    cache = args.out / f"single-lr{args.lr:g}-epochs{args.epochs}-test{args.n_test}"
    return single_model_outputs(train_fn, len(data.y_train), fraction, args.subsets, seed=0, out_dir=cache)


def multi_truth(data, args):
    return retrained_test_losses(
        data,
        args.n_test,
        subsets=args.lds_subsets,
        seeds=args.lds_seeds,
        epochs=args.epochs,
        out_dir=HERE / "out" / "lds",
    )


def record_and_unroll(data, args, seed: int, dtype=torch.float32, n_test=None, every=None):
    n_test = n_test or args.n_test
    run_dir = args.out / f"run-lr{args.lr:g}-seed{seed}-{str(dtype).removeprefix('torch.')}"
    steps = args.epochs * math.ceil(len(data.y_train) / BATCH)
    rec = lambda m, o: logix.record_trajectory(run_dir, m, o, every=every, total_steps=steps, overwrite=True)  # noqa: E731
    t = time.perf_counter()
    train_weighted(data, None, seed, args.epochs, recorder=rec, dtype=dtype, lr=args.lr)
    t_record = time.perf_counter() - t
    x, y = data.x_train.to(dtype), data.y_train

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    queries = (list(range(n_test)), (data.x_test[:n_test].to(dtype), data.y_test[:n_test]))
    t = time.perf_counter()
    scores = logix.unroll.unroll(
        run_dir, make_mlp(seed).to(dtype), loss_fn, lambda ids: (x[ids], y[ids]), queries
    )
    t_unroll = time.perf_counter() - t
    assert scores.train_ids == list(range(len(y)))
    return scores, t_record, t_unroll


def recording_overhead(data, args) -> dict[str, float]:
    """Seconds per training run: plain, recorded without intermediate checkpoints (the hooks and
    ids alone), recorded with checkpoints every √T steps; best of --repeats, interleaved."""
    steps = args.epochs * math.ceil(len(data.y_train) / BATCH)
    where = args.out / f"overhead-lr{args.lr:g}"
    kinds = {
        "plain": None,
        "record, no checkpoints": lambda m, o: logix.record_trajectory(
            where, m, o, every=10**9, overwrite=True
        ),
        "record, every √T": lambda m, o: logix.record_trajectory(
            where, m, o, total_steps=steps, overwrite=True
        ),
    }
    best = {k: float("inf") for k in kinds}
    for _ in range(args.repeats):
        for k, rec in kinds.items():
            t = time.perf_counter()
            train_weighted(data, None, 0, args.epochs, recorder=rec)
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def influence_scores(data, args) -> dict[str, torch.Tensor]:
    """Exact full-parameter influence on the seed-0 model (lds.py's machinery): Gauss-Newton
    (true Fisher) and empirical Fisher, both by dense Gram-form solves, at a few dampings."""
    from exact_true_fisher import PseudoGradients, exact_true_scores, layer_inputs
    from lds import exact_raw_scores, log_store, query_gradients, true_fisher_pass

    model = train_weighted(data, None, 0, args.epochs, lr=args.lr)
    x_test, y_test = data.x_test[: args.n_test], data.y_test[: args.n_test]
    path = args.out / f"influence-exact-lr{args.lr:g}"
    store = log_store(path, model, data.x_train, data.y_train, {"kind": "identity"})
    pseudo = PseudoGradients(store.modules)
    true_fisher_pass(path, model, data.x_train, statistics=("kfac",), on_rows=pseudo)
    q = query_gradients(path, model, x_test, y_test)
    rows = store.load()
    gn = exact_true_scores(
        store.modules,
        rows,
        q.values,
        layer_inputs(model, data.x_train),
        layer_inputs(model, x_test),
        pseudo,
        store.data_ids,
        len(data.y_train),
        args.dampings,
    )
    emp = exact_raw_scores(store, q.values, args.dampings)
    order = torch.tensor(store.data_ids).argsort()  # columns in training-row order
    out = {f"GN influence λ={d:g}": s[:, order] for d, s in gn.items()}
    out.update({f"emp. Fisher influence λ={d:g}": s[:, order] for d, s in emp.items()})
    return out


def smoothness(data, args) -> list[tuple[float, float]]:
    """(h, relative gap) of central finite differences of the float64 training in the weight of
    the --smooth-examples most influential examples of test image 0, against the replay."""
    scores, _, _ = record_and_unroll(data, args, 0, dtype=torch.float64, n_test=1)
    derivative = -scores.values[0]
    picks = derivative.abs().argsort(descending=True)[: args.smooth_examples].tolist()

    def loss_of(w):
        model = train_weighted(data, w, 0, args.epochs, dtype=torch.float64, lr=args.lr)
        return test_losses(model, data, 1)[0]

    rows = []
    for h in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        gaps = []
        for i in picks:
            w = torch.ones(len(data.y_train), dtype=torch.float64)
            w[i] += h
            up = loss_of(w)
            w[i] -= 2 * h
            down = loss_of(w)
            fd = float(up - down) / (2 * h)
            gaps.append(abs(fd - float(derivative[i])) / abs(float(derivative[i])))
        rows.append((h, max(gaps)))
    return rows


def drop_linearity(data, args, fraction: float = 0.05) -> list[tuple[float, float]]:
    """(t, ‖θ(t) − θ(0)‖ / t): the float64 training with the first single-model drop's examples
    weighted 1 − t; constant in t where the training is linear in the example weights."""
    dropped = ~drop_subsets(len(data.y_train), 1, fraction, seed=0)[0]

    def params(t: float) -> torch.Tensor:
        w = torch.ones(len(data.y_train), dtype=torch.float64)
        w[dropped] -= t
        model = train_weighted(data, w, 0, args.epochs, dtype=torch.float64, lr=args.lr)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    base = params(0.0)
    return [(t, float((params(t) - base).norm()) / t) for t in (1e-7, 1e-6, 1e-5, 1e-4, 1e-2, 1.0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=2, help="recorded training seeds (0..S-1)")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument(
        "--lr",
        type=float,
        default=LR,
        help="SGD learning rate (common.train_mlp's is 0.1; the "
        "multi-seed column, whose retrainings are lds.py's, is shown only for that one)",
    )
    p.add_argument("--subsets", type=int, default=50, help="single-model retrainings per drop fraction")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.5])
    p.add_argument("--lds-subsets", type=int, default=100, help="multi-seed LDS: half subsets (lds.py's)")
    p.add_argument("--lds-seeds", type=int, default=2, help="multi-seed LDS: seeds per subset (lds.py's)")
    p.add_argument("--dampings", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    p.add_argument("--repeats", type=int, default=3, help="timing repetitions of the recording overhead")
    p.add_argument("--smooth-examples", type=int, default=2)
    p.add_argument("--retrain-only", action="store_true", help="only fill the retraining caches")
    p.add_argument("--out", type=lambda s: __import__("pathlib").Path(s), default=HERE / "out" / "unroll")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    truths = {f: single_truth(data, args, f) for f in args.fractions}
    multi = multi_truth(data, args) if args.lr == LR else None
    if args.retrain_only:
        return

    times = recording_overhead(data, args)
    console.print(
        f"recording cost (best of {args.repeats}, s per 30-epoch run): "
        + ", ".join(f"{k} {v:.2f}" for k, v in times.items())
        + f"; ratios {times['record, no checkpoints'] / times['plain']:.3f} (hooks + ids) and "
        f"{times['record, every √T'] / times['plain']:.3f} (with checkpoint writes)"
    )
    methods: dict[str, torch.Tensor] = {}
    per_seed = []
    for seed in range(args.seeds):
        scores, t_record, t_unroll = record_and_unroll(data, args, seed)
        scores.save(args.out / f"scores-lr{args.lr:g}-seed{seed}.safetensors")
        per_seed.append(scores.values)
        console.print(
            f"seed {seed}: recorded training {t_record:.1f}s, replay + adjoint for {args.n_test} "
            f"queries {t_unroll:.1f}s ({t_unroll / times['plain']:.1f}× one plain training run)"
        )
    methods["unroll, seed 0"] = per_seed[0]
    if args.seeds > 1:
        methods[f"unroll, mean of {args.seeds} seeds"] = torch.stack(per_seed).mean(0)
    methods.update(influence_scores(data, args))

    multi_note = "" if multi is None else f"; multi-seed: {args.lds_subsets} halves × {args.lds_seeds} seeds"
    table = Table(
        title=f"digits (lr {args.lr:g}): LDS of {args.n_test} test images (mean Spearman; "
        f"single-model: seed 0, {args.subsets} drops per fraction{multi_note})"
    )
    table.add_column("attribution")
    for f in args.fractions:
        table.add_column(f"single {f:.0%}", justify="right")
    if multi is not None:
        table.add_column("multi-seed", justify="right")
    for name, s in methods.items():
        cells = [str(lds(s, *truths[f], output="loss")) for f in args.fractions]
        table.add_row(name, *cells, *([str(lds(s, *multi, output="loss"))] if multi is not None else []))
    console.print(table)
    for h, gap in smoothness(data, args):
        console.print(
            f"smoothness: finite-difference step h={h:.0e}: max relative gap to the replayed "
            f"derivative {gap:.1e}"
        )
    for t, ratio in drop_linearity(data, args):
        console.print(f"linearity: a 5% drop's weights lowered by t={t:.0e}: |Δθ|/t = {ratio:.3g}")


if __name__ == "__main__":
    main()
