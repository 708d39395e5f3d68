"""First `raw` query on the tiny-LM fact-tracing store at r=64, and what float32 products do
to its retrieval (issue #14 item 1).

The store (2,547 documents, 17 blocks of 64·64 = 4096 columns: N < w, so every block takes the
Gram form) is logged from the final model of `examples/tiny_lm/fact_tracing.py`'s training.
Reported, one run: the first `InfluenceEngine(store, "raw")` + `scores` (no caches), against
today's eigendecomposition path estimated from one block (its [w, w] statistics and float64
`eigh`, times the number of blocks; `--full-eigen` runs all of them); and MRR / recall@10 of
the engine's scores (float32 N²w products) against the all-float64 Gram form (exact).

    python benchmarks/bench_tiny_lm_query.py [--epochs 60 --rank 64 --threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "tiny_lm"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import logix  # noqa: E402
from logix.curvature.precondition import build_preconditioner  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--entities", type=int, default=80)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--full-eigen", action="store_true", help="eigendecompose every block")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=140)

    from corpus import generate
    from fact_tracing import log_documents, query_gradients, rank_metrics, train
    from models import TinyDecoder

    corpus = generate(n_entities=args.entities, seed=0)
    torch.manual_seed(0)
    model = TinyDecoder(len(corpus.vocab), 64, 2, 4, max_len=128)
    t = time.perf_counter()
    _, checkpoints = train(model, corpus, args.epochs, 3e-3, 32, 0, console, {args.epochs})
    console.print(f"trained {args.epochs} epochs in {time.perf_counter() - t:.0f} s")
    config = {
        "capture": {"types": ["Linear"], "loss_reduction": "mean", "attribution_only": True},
        "projection": {"kind": "random", "rank_in": args.rank, "rank_out": args.rank, "seed": 0},
    }
    run_dir = Path(tempfile.mkdtemp(prefix="logix-tinylm-")) / "store"
    log_documents(model, corpus, run_dir, config, 32, checkpoints)
    store = logix.open_store(run_dir)
    q = query_gradients(model, corpus, run_dir, corpus.test_questions, 32)
    widths = [m.width for m in store.modules]
    console.print(
        f"store: {len(store)} rows × {store.width} ({len(widths)} blocks, widest "
        f"{max(widths)}); {len(q)} queries"
    )

    t = time.perf_counter()
    engine = logix.InfluenceEngine(store, "raw", 0.1, device="cpu")
    auto = engine.scores(q, mode="cosine").values
    first = time.perf_counter() - t
    forms = sorted({type(b).__name__ for b in engine.preconditioner.blocks.values()})

    # Today's path, per block: the [w, w] statistics (one GEMM) and a float64 eigh.
    x = store.load()
    wide = [m for m in store.modules if m.width == max(widths)]
    blocks = wide if args.full_eigen else wide[:1]
    t = time.perf_counter()
    for m in blocks:
        g = x[:, m.columns]
        torch.linalg.eigh((g.T @ g).double() / len(g))
    per_block = (time.perf_counter() - t) / len(blocks)
    today = per_block * len(wide)  # the narrower blocks are cheap either way

    exact = build_preconditioner(store, "raw", 0.1, form="gram")
    qd, xd = q.values.double(), x.double()
    norms_q = exact.quadratic(qd).sqrt()
    norms_x = exact.quadratic(xd).sqrt()
    reference = (exact.apply(qd) @ xd.T) / (norms_q[:, None] * norms_x[None, :])
    relevant = [corpus.fact_documents(qq.fact) for qq in corpus.test_questions]
    ours, theirs = rank_metrics(auto, relevant), rank_metrics(reference.float(), relevant)
    console.print(f"first raw query (engine + cosine scores): {first:.1f} s, forms {forms}")
    console.print(
        f"today's eigendecomposition path, estimated: {today:.1f} s "
        f"({per_block:.1f} s per {max(widths)}-wide block × {len(wide)}; "
        f"{'all' if args.full_eigen else 'one'} measured) -> ratio {first / today:.3f}"
    )
    console.print(
        f"retrieval, engine (float32 products) vs float64 Gram form: MRR "
        f"{ours['mrr']:.4f} vs {theirs['mrr']:.4f} (Δ {ours['mrr'] - theirs['mrr']:+.4f}), "
        f"recall@10 {ours['recall@10']:.4f} vs {theirs['recall@10']:.4f}; scores rel. "
        f"diff {float((auto.double() - reference).norm() / reference.norm()):.2e}"
    )


if __name__ == "__main__":
    main()
