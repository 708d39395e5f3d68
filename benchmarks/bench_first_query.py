"""First and repeat `raw` queries against one `torch.matmul`, and against LogIX when it is given.

Stores: the digits MLP (1,397 rows, r=64: fc1 4096 wide, so N < w and fc1 takes the Gram form)
and a synthetic 65,536-row store (N ≫ w: the eigendecomposition form). Per store, one run:

- first `raw` query: a fresh `InfluenceEngine` (curvature from the rows, no caches) + `scores`
  of the queries; for comparison the eigendecomposition form of every block (today's path
  before the Gram form: all [w, w] statistics, float64 `eigh`) + the same scores;
- repeat `raw` and `identity` scores on a built engine (--repeats of each), against one
  `torch.matmul` of the scoring shapes [n_query, D] × [D, N] (rows in memory), the calls taking
  turns; the ratio is matmul time / engine time per turn, query preconditioning included in the
  engine's; every figure is the median [min–max] over the turns;
- the fraction of a repeat call spent preconditioning the queries vs scoring.

LogIX (logix-ai) is measured only with `--logix-python PATH`, the interpreter of an environment
where it is installed: its package is also named `logix`, so `logix_ai_query.py` runs there in
its own process (with the same trained weights; LogIX's own rows, covariance and `raw` Hessian)
and reports its first and repeat calls and one matmul of its scoring shapes, timed in that
process. Without it the LogIX line says "not measured".

    python benchmarks/bench_first_query.py [--queries 100 --big-rows 65536 --skip-eigen]
        [--logix-python /path/to/logix-ai-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import logix
from logix.curvature.precondition import build_preconditioner
from logix.query.engine import InfluenceEngine

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def digits_store(path: Path, n_query: int, epochs: int):
    """Train the digits MLP, log its 1,397 training gradients at r=64, capture test queries."""
    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    from common import load_digits, train_mlp

    data = load_digits()
    model = train_mlp(data.x_train, data.y_train, epochs=epochs)
    config = {
        "projection": {"kind": "random", "rank_in": 64, "rank_out": 64},
        "capture": {"attribution_only": True, "loss_reduction": "sum"},
    }
    run = logix.init(path, config=config, overwrite=True)
    run.watch(model)
    for start in range(0, len(data.y_train), 256):
        ids = list(range(start, min(start + 256, len(data.y_train))))
        with run(data_id=ids):
            F.cross_entropy(model(data.x_train[ids]), data.y_train[ids], reduction="sum").backward()
    run.finalize()
    query = logix.init(path, mode="query")
    query.watch(model)
    with query(data_id=list(range(n_query))):
        F.cross_entropy(model(data.x_test[:n_query]), data.y_test[:n_query], reduction="sum").backward()
    return logix.open_store(path), query.gradients(), model


def synthetic_store(path: Path, rows: int, width: int, n_query: int):
    from bench_query import build  # blocks of 32×32 (w = 1024), raw statistics logged

    path.mkdir(parents=True, exist_ok=True)
    build(path, rows, width, "float32", 4096)
    store = logix.open_store(path)
    q = logix.Gradients(
        torch.randn(n_query, store.width), list(range(n_query)), store.modules, store.fingerprint
    )
    return store, q


def clear_caches(store) -> None:
    """Remove recomputed statistics and eigendecompositions: the next query starts cold."""
    for pattern in ("raw-stream*", "eigen-*"):
        for f in Path(store.curvature_dir).glob(pattern):
            f.unlink()


def interleaved(calls: dict, repeats: int) -> dict[str, list[float]]:
    """`repeats` times of each call, the calls taking turns (so that a busy machine's drift
    affects them alike): turn i of every call is entry i of its list."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """median [min–max] of `values` × scale."""
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} [{min(v):.{digits}f}–{max(v):.{digits}f}]"


def ratios(top: list[float], bottom: list[float]) -> list[float]:
    """top_i / bottom_i per turn."""
    return [a / b for a, b in zip(top, bottom)]


def measure_logix_ai(python: str, model, n_query: int, repeats: int, threads: int, root: Path) -> dict:
    """LogIX's figures from `logix_ai_query.py` run by `python` (its own environment, without
    this repository on its path): {"first": s, "repeat": [s], "matmul": [s], "version"}."""
    import numpy as np

    weights, work = root / "logix-ai-weights", root / "logix-ai-work"
    weights.mkdir()
    work.mkdir()
    for k, v in model.state_dict().items():
        np.save(weights / f"{k}.npy", v.detach().cpu().numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # LogIX's `logix`, not ours
    args = [python, str(HERE / "logix_ai_query.py"), str(weights), str(work)]
    args += ["--queries", str(n_query), "--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(args, env=env, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"LogIX's run failed ({python}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(
    name: str, store, q, repeats: int, skip_eigen: bool, logged_stats: bool, device: str = "cpu"
) -> dict:
    out: dict = {"store": name, "rows": len(store), "width": store.width, "queries": len(q)}
    clear_caches(store)
    t = time.perf_counter()
    engine = InfluenceEngine(store, "raw", 0.1, device=device)
    raw = engine.scores(q).values
    out["first"] = time.perf_counter() - t
    out["forms"] = sorted({type(b).__name__ for b in engine.preconditioner.blocks.values()})
    if not skip_eigen:
        clear_caches(store)
        t = time.perf_counter()
        pre = build_preconditioner(store, "raw", 0.1, form="eigen")
        qp = pre.apply(q.values.double()).float()
        eig = torch.cat([qp @ x.T for _, x in store.iter_chunks(rows=engine.chunk_rows)], dim=1)
        out["first_eigen"] = time.perf_counter() - t
        out["eigen_vs_gram"] = float((eig - raw).norm() / raw.norm())
    identity = InfluenceEngine(store, "identity", device=device)
    rows = store.load().to(device)
    qm = torch.randn(len(q), store.width, device=device)
    sync = torch.cuda.synchronize if rows.device.type == "cuda" else (lambda: None)
    calls = {
        "repeat": lambda: engine.scores(q),
        "identity": lambda: identity.scores(q),
        "matmul": lambda: (torch.matmul(qm, rows.T), sync()),
        "precondition": lambda: engine._shared_queries(q, streamed=True, norms=False),
    }
    engine.scores(q)
    identity.scores(q)  # both engines warm (resident rows, kept X̃)
    out.update(interleaved(calls, repeats))
    out["logged_stats"] = logged_stats
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--epochs", type=int, default=30, help="digits MLP training epochs")
    p.add_argument("--big-rows", type=int, default=65536, help="rows of the synthetic store (0: skip)")
    p.add_argument("--big-width", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-eigen", action="store_true", help="skip the eigendecomposition-form run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the engine and the matmul run")
    p.add_argument(
        "--logix-python",
        help="the Python of an environment with LogIX (logix-ai) installed: measure it too",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    root = Path(tempfile.mkdtemp(prefix="logix-first-"))
    try:
        results = []
        store, q, model = digits_store(root / "digits", args.queries, args.epochs)
        results.append(measure("digits r=64", store, q, args.repeats, args.skip_eigen, False, args.device))
        if args.logix_python:
            other = measure_logix_ai(args.logix_python, model, args.queries, args.repeats, args.threads, root)
            results[0]["logix_ai"] = other
        if args.big_rows:
            store, q = synthetic_store(root / "big", args.big_rows, args.big_width, args.queries)
            results.append(
                measure(
                    f"synthetic {args.big_rows}", store, q, args.repeats, args.skip_eigen, True, args.device
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = Table(
        title=f"first and repeat raw queries ({args.queries} queries, {torch.get_num_threads()} thread; "
        f"repeats: median [min–max] of {args.repeats} turns)",
        title_justify="left",
    )
    for col in (
        "store",
        "forms",
        "first raw",
        "first, eigen form",
        "repeat raw (ms)",
        "matmul/raw",
        "matmul/identity",
        "precondition share",
    ):
        table.add_column(col, justify="left" if col in ("store", "forms") else "right")
    for r in results:
        table.add_row(
            f"{r['store']} ({r['rows']}×{r['width']})",
            ",".join(r["forms"]),
            f"{r['first']:.2f} s",
            f"{r['first_eigen']:.2f} s" if "first_eigen" in r else "-",
            spread(r["repeat"], 1e3, 1),
            spread(ratios(r["matmul"], r["repeat"])),
            spread(ratios(r["matmul"], r["identity"])),
            spread(ratios(r["precondition"], r["repeat"])),
        )
    console.print(table)
    for r in results:
        line = f"{r['store']}: matmul {spread(r['matmul'], 1e3, 1)} ms"
        if "eigen_vs_gram" in r:
            line += (
                f"; scores of the eigen form vs the engine's, relative difference {r['eigen_vs_gram']:.2e}"
            )
        console.print(line)
    other = results[0].get("logix_ai")
    if other is None:
        console.print(
            "LogIX: not measured (pass --logix-python PATH, the Python of an environment with logix-ai)"
        )
    else:
        ours = statistics.median(results[0]["repeat"])
        console.print(
            f"LogIX {other['version']} on digits (its process, its rows of width {other['width']}): first "
            f"{other['first']:.2f} s (logix {results[0]['first']:.2f} s, "
            f"{other['first'] / results[0]['first']:.1f}× faster); "
            f"repeat {spread(other['repeat'], 1e3, 1)} ms "
            f"(logix {ours * 1e3:.1f} ms, {statistics.median(other['repeat']) / ours:.1f}× faster); "
            f"its matmul/repeat {spread(ratios(other['matmul'], other['repeat']), 1, 3)}"
        )


if __name__ == "__main__":
    main()
