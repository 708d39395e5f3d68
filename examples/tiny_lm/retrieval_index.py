"""The approximate index on the tiny LM's real store: recall of the exact top 100, query time,
and token-level re-ranking on the index's top 100 against re-ranking on the exact top 100.

The model, corpus and kfac-whitened r=64 store of `retrieval.py` (configs/retrieval.yaml:
identity preconditioner, cosine; whitening damping 1e-5), cached in the same folder, so a run
of either script reuses the other's. The index is built with `logix.build_index` defaults
(nprobe calibrated for recall 0.95 on sampled rows); `--nprobe` adds fixed settings to compare.
Re-ranking: `logix.Rerank(recompute, candidates=100, window=w)`, w ∈ {1, 2} chosen on the tuning
half of the questions, MRR reported on the other half, as in `retrieval.py`.

    PYTHONPATH=. .venv/bin/python examples/tiny_lm/retrieval_index.py   # training dominates (as retrieval.py)
    PYTHONPATH=. .venv/bin/python examples/tiny_lm/retrieval_index.py --entities 20 --epochs 20 --d-model 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import logix

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fact_tracing import add_model_arguments, query_gradients, rank_metrics  # noqa: E402
from retrieval import build_store, final_model, memoised, token_recompute  # noqa: E402

WINDOWS = (1, 2)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)]
    return sum(hits) / exact.numel()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, entities=80, epochs=60)
    p.set_defaults(d_model=128)  # retrieval.py's model
    p.add_argument("--whiten-damping", type=float, default=1e-5, help="configs/retrieval.yaml's")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--nprobe", type=int, nargs="*", default=[], help="fixed nprobe values to compare too")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    console, t0 = Console(), time.perf_counter()
    model, corpus, out, _, _ = final_model(args, console)
    proj = {"kind": "kfac-whitened", "rank_in": 64, "rank_out": 64, "seed": args.seed}
    wd = args.whiten_damping
    run_dir = build_store(
        model, corpus, out / f"kfac-whitened-r64-w{wd}", {**proj, "damping": wd}, args.batch
    )
    store = logix.open_store(run_dir)
    questions = corpus.test_questions
    relevant = [corpus.fact_documents(q.fact) for q in questions]
    tune, report = list(range(0, len(questions), 2)), list(range(1, len(questions), 2))
    q = query_gradients(model, corpus, run_dir, questions, args.batch)
    k = min(args.candidates, len(store))

    t_build = time.perf_counter()
    index = logix.build_index(store)
    t_build = time.perf_counter() - t_build
    c = index.record["calibration"]
    console.print(
        f"{len(store)} documents × {store.width}; index: {index.nlist} cells, calibrated nprobe "
        f"{index.nprobe} (recall@{c['k']} {c['recall']} on {c['queries']} sampled rows), "
        f"built in {t_build:.1f} s"
    )
    exact = logix.InfluenceEngine(store, preconditioner="identity", mode="cosine")
    probes = sorted(set(args.nprobe) | {index.nprobe})
    fast = {
        n: logix.InfluenceEngine(
            store, preconditioner="identity", mode="cosine", index=logix.open_index(store, nprobe=n)
        )
        for n in probes
    }
    truth = exact.top_k(q, k=k)
    times: dict = {"exact": []}
    found = {}
    for _ in range(args.repeats):  # interleaved repeats
        t = time.perf_counter()
        exact.top_k(q, k=k)
        times["exact"].append(time.perf_counter() - t)
        for n, engine in fast.items():
            t = time.perf_counter()
            found[n] = engine.top_k(q, k=k)
            times.setdefault(n, []).append(time.perf_counter() - t)

    # Re-ranking of each first stage's top `candidates`, window chosen on the tuning half.
    recompute = memoised(token_recompute(model, corpus, run_dir, args.batch))
    n_docs = len(corpus.documents)

    def reranked(engine) -> dict:
        by_window = {}
        for w in WINDOWS:
            rerank = logix.Rerank(recompute, args.candidates, w, "window", query_batch=len(questions))
            top = engine.top_k(q, k=args.candidates, mode="cosine", rerank=rerank)
            scores = torch.full((len(questions), n_docs), -1e30, dtype=torch.float64)
            scores.scatter_(1, top.indices, top.values.double())
            by_window[w] = scores
        best = max(
            WINDOWS, key=lambda w: rank_metrics(by_window[w][tune], [relevant[i] for i in tune])["mrr"]
        )
        return {"window": best, **rank_metrics(by_window[best][report], [relevant[i] for i in report])}

    def first_stage(top) -> dict:
        scores = torch.full((len(questions), n_docs), -1e30, dtype=torch.float64)
        scores.scatter_(1, top.indices, top.values.double())
        return rank_metrics(scores[report], [relevant[i] for i in report])

    rows = [{"search": "exact scan", "recall": 1.0, "seconds": statistics.median(times["exact"])}]
    rows[0].update(first=first_stage(truth), rerank=reranked(exact))
    for n in probes:
        rows.append(
            {
                "search": f"index, nprobe {n}/{index.nlist}" + (" (calibrated)" if n == index.nprobe else ""),
                "recall": recall(found[n].indices, truth.indices),
                "seconds": statistics.median(times[n]),
                "first": first_stage(found[n]),
                "rerank": reranked(fast[n]),
            }
        )
    table = Table(
        title=f"tiny LM store ({len(store)} documents × {store.width}, kfac-whitened r=64, cosine): "
        f"top {k} of {len(questions)} questions; MRR on the {len(report)} reported ones",
        title_justify="left",
    )
    for col in ("first stage", f"recall@{k}", "seconds", "MRR", "MRR re-ranked (window)", "Δ re-ranked MRR"):
        table.add_column(col, justify="left" if col == "first stage" else "right")
    base = rows[0]["rerank"]["mrr"]
    for r in rows:
        table.add_row(
            r["search"],
            f"{r['recall']:.3f}",
            f"{r['seconds']:.4f}",
            f"{r['first']['mrr']:.3f}",
            f"{r['rerank']['mrr']:.3f} ({r['rerank']['window']})",
            f"{r['rerank']['mrr'] - base:+.3f}",
        )
    console.print(table)
    result = {
        "documents": len(store),
        "width": store.width,
        "nlist": index.nlist,
        "calibration": c,
        "build_seconds": t_build,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    (args.out / "retrieval_index.json").write_text(json.dumps(result, indent=2, default=str))
    console.print(f"total {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
