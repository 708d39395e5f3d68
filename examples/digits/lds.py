"""How well do logix scores predict retraining? The linear datamodeling score on digits.

    .venv/bin/python examples/digits/lds.py                 # M=100 subsets × 2 seeds, 100 test images
    .venv/bin/python examples/digits/lds.py --subsets 300   # more subsets (the first 100 are reused)
    .venv/bin/python examples/digits/lds.py --true-ranks    # no true-Fisher rows but the exact one
    .venv/bin/python examples/digits/lds.py --true-ranks 32 64   # true-Fisher rows at r=32 too

1. Train the MLP on all 1,397 training images; log every training example's gradient at the
   final checkpoint in one attribution pass (`capture.attribution_only`, sum-reduced loss), once
   per projection: random ranks 16, 32, 64 and `identity` (exact full per-example gradients).
2. Capture the test gradients of the measurement, the test example's loss; score with the
   `identity` preconditioner (gradient dot products) and `raw` (projected empirical Fisher) at
   several dampings, and (unless --no-kfac) `kfac`, `ekfac` and `ekfac` refined by --refine
   conjugate-gradient passes towards the raw solve (K-FAC factors are logged with the rows).
   For the identity projection, the exact raw reference (a 16,640-wide Fisher
   block for fc1, too big for an eigendecomposition) is computed here through the N×N Gram
   matrix, with logix's damping definition; it is checked against the engine on a small store.
   True Fisher (Gauss–Newton: labels drawn from the model, `run.fit_curvature(fisher="true")`
   over the training set after logging): `raw` with `fisher="true"` for the random and PCA
   stores of `--true-ranks`, and the exact full-parameter reference from the identity store's
   pseudo-gradients (`exact_true_fisher.py`, checked against the engine on an fc2-only store).
   True-Fisher PCA stores (`tf-pca r=…`, ranks of `--true-ranks`): P_out from the output-gradient
   covariance under the model's own predictions (`run.fit_projections(fisher="true")`), P_in as
   for PCA. True-Fisher rows are scored at the dampings of `--true-dampings`: half-decade steps
   from 0.01 to 10 (on `--dampings` alone the exact reference's best was the largest, λ=1, and
   PCA r=64's optimum fell between two grid points).
3. Ground truth: retrain on M random half subsets (each with a few seeds, averaged), measure the
   test losses, cache them under out/lds/retrain-*/ (resumable), and report the LDS: the mean
   Spearman correlation between the summed scores of a subset and the negated test loss.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import HERE, accuracy, load_digits, retrained_test_losses, train_mlp
from exact_true_fisher import PseudoGradients, check_outer_products, exact_true_scores, layer_inputs
from rich.console import Console
from rich.table import Table
from torch import nn

import logix
from logix.eval import bootstrap_ci, lds

console = Console()
if not console.is_terminal:  # a log file: wide enough for the table on one line per row
    console = Console(width=150)


def log_store(
    path: Path,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    projection: dict,
    batch_size: int = 256,
    include: tuple[str, ...] = ("*",),
    pca_fisher: str = "empirical",
):
    """One attribution pass over (x, y) at the model's current weights into a store at `path`;
    for PCA, first a statistics pass with the empirical Fisher (the labels y) or the true one."""
    # The identity projection's raw statistics would be a 16,640² float64 block (2.2 GB) for fc1:
    # skip them; the exact reference is computed from the rows instead. K-FAC factors are small
    # for every projection ([r_in, r_in] and [r_out, r_out]).
    statistics = ["kfac"] + ([] if projection["kind"] == "identity" else ["raw"])
    config = {
        "projection": projection,
        "curvature": {"statistics": statistics},
        "capture": {"attribution_only": True, "loss_reduction": "sum", "include": list(include)},
    }
    run = logix.init(path, config=config, overwrite=True)
    run.watch(model)

    def one_pass():
        for start in range(0, len(y), batch_size):
            ids = list(range(start, min(start + batch_size, len(y))))
            with run(data_id=ids):
                F.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()

    if projection["kind"] == "pca" and pca_fisher == "true":  # labels drawn from the model
        with run.fit_projections(fisher="true") as fit:
            for start in range(0, len(y), batch_size):
                ids = list(range(start, min(start + batch_size, len(y))))
                with fit(data_id=ids):
                    fit.backward(model(x[ids]))
    elif projection["kind"] in ("pca", "kfac-whitened"):  # the pass that sets the projections
        with run.fit_projections():
            one_pass()
    one_pass()
    run.finalize()
    return logix.open_store(path)


def true_fisher_pass(
    path: Path, model: nn.Module, x: torch.Tensor, statistics=("raw",), on_rows=None, batch_size: int = 256
) -> None:
    """Add true-Fisher statistics to the store at `path`: labels drawn from the model, one
    backward pass per class and batch; no rows are stored. `on_rows` sees the pseudo-gradients."""
    run = logix.init(path, resume=True)
    run.watch(model)
    with run.fit_curvature(fisher="true", statistics=statistics, on_rows=on_rows) as fit:
        for start in range(0, len(x), batch_size):
            ids = list(range(start, min(start + batch_size, len(x))))
            with fit(data_id=ids):
                fit.backward(model(x[ids]))
    run.finalize()


def query_gradients(path: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Gradients of each test example's loss (the measurement), captured with the store's
    projections: `.values` [n_test, D]."""
    q = logix.init(path, mode="query")
    q.watch(model)
    with q(data_id=list(range(len(y)))):
        F.cross_entropy(model(x), y, reduction="sum").backward()
    return q.gradients()


def exact_raw_scores(store, queries: torch.Tensor, dampings: list[float]) -> dict[float, torch.Tensor]:
    """Raw-preconditioned scores Σ_m q_m (F_m + λ_m I)⁻¹ x_mᵀ for every train row, exactly.

    F_m = X_mᵀX_m / N with X_m [N, w] the module's rows; λ_m = damping · trace(F_m) / w (logix's
    "damping · mean eigenvalue"). With w > N the w×w inverse is avoided through the push-through
    identity (F + λI)⁻¹X_mᵀ = N X_mᵀ(K + NλI)⁻¹, K = X_m X_mᵀ [N, N], so
    scores_m = N (Q_m X_mᵀ)(K + NλI)⁻¹; one eigendecomposition of K serves every damping.
    queries: [n_q, D]; returns {damping: [n_q, N] float64}.
    """
    x_all = store.load()
    n = x_all.shape[0]
    out = {d: torch.zeros(queries.shape[0], n, dtype=torch.float64) for d in dampings}
    for m in store.modules:
        xm = x_all[:, m.columns].to(torch.float64)  # [N, w]
        qm = queries[:, m.columns].to(torch.float64)  # [n_q, w]
        gram = xm @ xm.T  # [N, N]
        cross = qm @ xm.T  # [n_q, N]
        evals, evecs = torch.linalg.eigh(gram)
        mean_eig = float(torch.trace(gram)) / n / m.width  # trace(F_m) / w
        projected = cross @ evecs  # [n_q, N]
        for d in dampings:
            lam = d * mean_eig
            out[d] += n * (projected / (evals.clamp(min=0) + n * lam)) @ evecs.T
        del xm, gram
    return out


def check_true_fisher(
    path: Path, model: nn.Module, data, x_test: torch.Tensor, y_test: torch.Tensor, n_fit: int = 400
) -> None:
    """Both solves of `exact_true_scores` against InfluenceEngine(fisher="true") on a store
    of fc2 alone (identity projection, 2,570 wide: narrow enough for logix's raw statistics),
    its true Fisher taken over the first `n_fit` training images (a subset, as allowed)."""
    store = log_store(path, model, data.x_train, data.y_train, {"kind": "identity"}, include=("fc2",))
    pseudo = PseudoGradients(store.modules)
    true_fisher_pass(path, model, data.x_train[:n_fit], on_rows=pseudo)
    q = query_gradients(path, model, x_test, y_test)
    theirs = logix.InfluenceEngine(store, "raw", damping=0.1, fisher="true").scores(q).values.double()
    for gram in (False, True):
        mine = exact_true_scores(
            store.modules,
            store.load(),
            q.values,
            layer_inputs(model, data.x_train),
            layer_inputs(model, x_test),
            pseudo,
            store.data_ids,
            n_fit,
            [0.1],
            gram=gram,
        )[0.1]
        rel = float((mine - theirs).abs().max() / theirs.abs().max())
        console.print(
            f"check: exact true-Fisher scores ({'Gram' if gram else 'eigen'} solve) vs "
            f"InfluenceEngine(fisher='true') on an fc2-only store, damping 0.1: "
            f"max |diff| / max |score| = {rel:.1e}"
        )


def lds_cell(result) -> str:
    return f"{result.mean:+.3f} [{result.ci_low:+.3f}, {result.ci_high:+.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subsets", type=int, default=100, help="M: retrained models (half subsets)")
    p.add_argument("--seeds", type=int, default=2, help="training seeds averaged per subset")
    p.add_argument("--n-test", type=int, default=100, help="test images to attribute")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument(
        "--true-ranks",
        type=int,
        nargs="*",
        default=[64],
        help="ranks whose random and PCA stores also get true-Fisher rows, and that get "
        "true-Fisher PCA stores (tf-pca); the last one is the target's rank",
    )
    p.add_argument(
        "--true-dampings",
        type=float,
        nargs="+",
        default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
        help="dampings of the true-Fisher rows (raw, kfac, ekfac and the exact reference): "
        "half-decade steps, up to 10 (the exact reference's best is λ=1)",
    )
    p.add_argument(
        "--whiten-dampings",
        type=float,
        nargs="*",
        default=[0.1, 1.0],
        help="projection.damping of the kfac-whitened stores (white r=…, one store each)",
    )
    p.add_argument(
        "--kfac",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score with kfac, ekfac and refined ekfac (default: on)",
    )
    p.add_argument("--refine", type=int, default=3, help="refinement passes of the ekfac+refine column")
    p.add_argument("--projections", nargs="+", help="only these stores (e.g. r=64 exact)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the MLP is tiny)")
    p.add_argument("--out", type=Path, default=HERE / "out" / "lds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. the model and its stores ------------------------------------------------------------
    data = load_digits()
    x_test, y_test = data.x_test[: args.n_test], data.y_test[: args.n_test]
    t = time.perf_counter()
    model = train_mlp(data.x_train, data.y_train, epochs=args.epochs, seed=0)
    timings["train full model"] = time.perf_counter() - t
    console.print(
        f"full model: train acc {accuracy(model, data.x_train, data.y_train):.3f}, "
        f"test acc {accuracy(model, data.x_test, data.y_test):.3f} "
        f"({args.epochs} epochs, {timings['train full model']:.1f}s)"
    )

    projections = {f"r={r}": {"kind": "random", "rank_in": r, "rank_out": r, "seed": 0} for r in args.ranks}
    projections.update({f"pca r={r}": {"kind": "pca", "rank_in": r, "rank_out": r} for r in args.ranks})
    projections.update(
        {f"tf-pca r={r}": {"kind": "pca", "rank_in": r, "rank_out": r} for r in args.true_ranks}
    )
    projections.update(
        {
            f"white r={r} w={w:g}": {"kind": "kfac-whitened", "rank_in": r, "rank_out": r, "damping": w}
            for r in args.ranks
            for w in args.whiten_dampings
        }
    )
    projections["exact"] = {"kind": "identity"}
    if args.projections:
        projections = {k: v for k, v in projections.items() if k in args.projections}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    refinement: dict[tuple[str, float], tuple[float, float]] = {}
    stores = {}
    true_rows = [f"{kind}r={r}" for r in args.true_ranks for kind in ("", "pca ", "tf-pca ")]
    pseudo = None
    t = time.perf_counter()
    for name, proj in projections.items():
        path = args.out / "stores" / name.replace("=", "").replace(" ", "-")
        pca_fisher = "true" if name.startswith("tf-pca") else "empirical"
        store = log_store(path, model, data.x_train, data.y_train, proj, pca_fisher=pca_fisher)
        if name in true_rows:  # EK-FAC's true-Fisher eigenvalues follow from raw
            true_fisher_pass(path, model, data.x_train, statistics=("raw", "kfac"))
        elif name == "exact":  # fc1's raw block is too wide to keep: keep the pseudo-gradients
            pseudo = PseudoGradients(store.modules)
            true_fisher_pass(path, model, data.x_train, statistics=("kfac",), on_rows=pseudo)
            if args.kfac:  # EK-FAC eigenvalues: a second pass in the K-FAC eigenbases
                true_fisher_pass(path, model, data.x_train, statistics=("ekfac",))
        q = query_gradients(path, model, x_test, y_test)
        stores[name] = (store, q)
        widths = ", ".join(f"{m.name} {m.r_out}×{m.r_in}" for m in store.modules)
        console.print(f"store {name:10s} D={store.width:6d} ({widths})")
    timings["log stores + query gradients"] = time.perf_counter() - t

    t = time.perf_counter()
    train_inputs, query_inputs = layer_inputs(model, data.x_train), layer_inputs(model, x_test)
    store_of = {name: name for name in stores}
    for name, (store, q) in stores.items():
        row = {"identity": logix.InfluenceEngine(store, preconditioner="identity").scores(q).values}
        if name == "exact":
            for d, s in exact_raw_scores(store, q.values, args.dampings).items():
                row[f"raw λ={d:g}"] = s
        else:
            for d in args.dampings:
                row[f"raw λ={d:g}"] = (
                    logix.InfluenceEngine(store, preconditioner="raw", damping=d).scores(q).values
                )
        if args.kfac:
            refined = f"ekfac+r{args.refine}"
            for d in args.dampings:
                for label, kind, refine in (
                    ("kfac", "kfac", 0),
                    ("ekfac", "ekfac", 0),
                    (refined, "ekfac", args.refine),
                ):
                    engine = logix.InfluenceEngine(store, preconditioner=kind, damping=d, refine=refine)
                    row[f"{label} λ={d:g}"] = engine.scores(q).values
                    if refine:
                        res = engine.refinement_residuals
                        refinement[(name, d)] = (float(res[0].median()), float(res[-1].median()))
        scores[name] = row
        if name in true_rows or name == "exact":
            true_row = {"identity": row["identity"]}
            if name == "exact":
                train_rows = store.load()
                console.print(
                    f"check: exact store rows are outer products δ x̄ᵀ: max deviation "
                    f"{check_outer_products(train_rows, train_inputs, store.modules):.1e} of max |G|"
                )
                exact_true = exact_true_scores(
                    store.modules,
                    train_rows,
                    q.values,
                    train_inputs,
                    query_inputs,
                    pseudo,
                    store.data_ids,
                    len(data.y_train),
                    args.true_dampings,
                )
                true_row.update({f"raw λ={d:g}": s for d, s in exact_true.items()})
            for kind in ["raw"] * (name != "exact") + ["kfac", "ekfac"] * args.kfac:
                for d in args.true_dampings:
                    engine = logix.InfluenceEngine(store, kind, damping=d, fisher="true")
                    true_row[f"{kind} λ={d:g}"] = engine.scores(q).values
            scores[f"{name} · true F"] = true_row
            store_of[f"{name} · true F"] = name
    timings["scores"] = time.perf_counter() - t
    for (name, d), (first, last) in refinement.items():
        console.print(
            f"refinement {name} λ={d:g}: median relative residual ‖q − (F+λI)x‖/‖q‖ "
            f"{first:.2e} (plain EK-FAC) → {last:.2e} after {args.refine} CG passes"
        )
    if args.kfac and "exact" in scores:  # refined EK-FAC approaches the exact raw solve
        for d in args.dampings:
            exact, mine = scores["exact"][f"raw λ={d:g}"], scores["exact"]
            for label in ("ekfac", f"ekfac+r{args.refine}"):
                gap = float((mine[f"{label} λ={d:g}"].double() - exact).norm() / exact.norm())
                console.print(f"exact store, λ={d:g}: ‖{label} − raw‖ / ‖raw‖ = {gap:.2e}")

    # The exact references share logix's damping definition: check them against the engine.
    check = f"r={max(args.ranks)}"
    if check in stores and 0.1 in args.dampings:
        store, q = stores[check]
        mine = exact_raw_scores(store, q.values, [0.1])[0.1]
        theirs = scores[check]["raw λ=0.1"].to(torch.float64)
        rel = float((mine - theirs).abs().max() / theirs.abs().max())
        console.print(
            f"check: Gram-form raw scores vs InfluenceEngine on the {check} store, damping "
            f"0.1: max |diff| / max |score| = {rel:.1e}"
        )
    t = time.perf_counter()
    check_true_fisher(args.out / "stores" / "check-fc2", model, data, x_test, y_test)
    timings["true-Fisher check"] = time.perf_counter() - t

    # 2. ground truth ------------------------------------------------------------------------------
    t = time.perf_counter()
    subsets, outputs = retrained_test_losses(
        data, args.n_test, subsets=args.subsets, seeds=args.seeds, epochs=args.epochs, out_dir=args.out
    )
    timings[f"retrain {args.subsets}×{args.seeds} (cached ones skipped)"] = time.perf_counter() - t

    # 3. LDS --------------------------------------------------------------------------------------
    columns = list(dict.fromkeys(c for row in scores.values() for c in row))  # true-Fisher rows: more λ
    kinds = list(dict.fromkeys(c.split(" λ=")[0] for c in columns))
    columns.sort(
        key=lambda c: (float(c.split("λ=")[1]) if "λ=" in c else -1.0, kinds.index(c.split(" λ=")[0]))
    )
    results = {
        name: {c: lds(s, subsets, outputs, output="loss") for c, s in row.items()}
        for name, row in scores.items()
    }
    family = {c: c.split(" λ=")[0] for c in columns}  # identity, raw, kfac, ekfac, ekfac+r3
    groups = [["identity"] + [c for c in columns if family[c] == "raw"]]
    groups += [[c for c in columns if family[c] == kind] for kind in kinds if kind not in ("identity", "raw")]
    for i, group in enumerate(g for g in groups if g):
        wide = i > 0  # many columns: means only (the damping-chosen lines below give CIs)
        what = "mean Spearman" if wide else "mean Spearman [95% bootstrap CI]"
        table = Table(
            title=f"LDS on digits: {args.n_test} test images, M={args.subsets} half subsets × "
            f"{args.seeds} seeds, measurement = test loss ({what})"
        )
        table.add_column("projection")
        table.add_column("D", justify="right")
        for c in group:
            table.add_column(c, justify="right")
        for name, row in results.items():
            cells = [
                "—" if c not in row else f"{row[c].mean:+.3f}" if wide else lds_cell(row[c]) for c in group
            ]
            table.add_row(name, str(stores[store_of[name]][0].width), *cells)
        console.print(table)

    # Damping is a hyperparameter: choose it on one half of the test images, report the other.
    half = args.n_test // 2
    chosen: dict[tuple[str, str], str] = {}
    for kind in dict.fromkeys(f for f in family.values() if f != "identity"):
        cols = [c for c in columns if family[c] == kind]
        for name in results:
            present = [c for c in cols if c in results[name]]
            if not present:
                continue
            best = chosen[(name, kind)] = max(
                present, key=lambda c: float(results[name][c].per_test[:half].nanmean())
            )
            held = results[name][best].per_test[half:]
            low, high = bootstrap_ci(held)
            console.print(
                f"{name}: {kind} damping chosen on test images 0..{half - 1}: {best}; its LDS on "
                f"images {half}..{args.n_test - 1}: {float(held.nanmean()):+.3f} [{low:+.3f}, {high:+.3f}]"
            )
    raw_cols = [c for c in columns if family[c] == "raw"]
    if check in results and "exact" in results:
        pairs = [(c, c) for c in raw_cols if c in results[check] and c in results["exact"]]
        if chosen[(check, "raw")] != chosen[("exact", "raw")]:
            pairs.append((chosen[(check, "raw")], chosen[("exact", "raw")]))
        for ours, ref in pairs:
            gap = results[check][ours].per_test - results["exact"][ref].per_test
            low, high = bootstrap_ci(gap)
            label = ours if ours == ref else f"{ours} (chosen) vs exact {ref} (chosen)"
            console.print(
                f"projection gap {check} − exact, {label}: {float(gap.nanmean()):+.3f} "
                f"[{low:+.3f}, {high:+.3f}] (paired over all {args.n_test} test images)"
            )

    # The target: PCA at the largest true-Fisher rank with the best preconditioner (chosen with
    # its damping on the first half) against exact full-parameter true-Fisher influence (raw, its
    # damping chosen on the first half too); reported on the second half. Smaller ranks: the same.
    exact = "exact · true F"

    def target_line(label: str, candidates: list[tuple[str, str]]) -> None:
        name, best = max(candidates, key=lambda nc: float(results[nc[0]][nc[1]].per_test[:half].nanmean()))
        ref = chosen[(exact, "raw")]
        gap = results[name][best].per_test - results[exact][ref].per_test
        low, high = bootstrap_ci(gap[half:])
        console.print(
            f"target{label} {name} ({best}) − {exact} ({ref}): {float(gap[half:].nanmean()):+.3f} "
            f"[{low:+.3f}, {high:+.3f}] on images {half}..{args.n_test - 1}; "
            f"{float(gap.nanmean()):+.3f} over all (paired)"
        )

    for r in args.true_ranks[::-1]:
        targets = [
            n
            for n in (f"pca r={r}", f"pca r={r} · true F", f"tf-pca r={r}", f"tf-pca r={r} · true F")
            if n in results and exact in results
        ]
        for name in targets:
            target_line("", [(name, c) for c in results[name] if family[c] != "identity"])
        if len(targets) > 1:  # the PCA variant, preconditioner and damping all chosen on the first half
            target_line(
                f", best PCA r={r} variant:",
                [(n, c) for n in targets for c in results[n] if family[c] != "identity"],
            )

    timings["total"] = time.perf_counter() - t_all
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
