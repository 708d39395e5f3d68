"""Which logix setting finds the documents that taught the model a fact, on the final model alone?

The corpus and training of `fact_tracing.py` with a 128-wide model (so that r = 64 per side is
8.7% of the exact width), cached with AdamW's second moments and Shampoo's statistics. One
store per projection (random, pca, kfac-whitened at each rank; identity for exact gradients),
the held-out questions' answer-token gradients as queries, `cosine` scores. Every damping (the
engine's, the whitening's), whitening power, re-ranking window and candidate count is chosen on
the *tuning* half of the questions (even positions) and reported on the other half (odd ones).

Rows: each projection with the `identity` preconditioner (plain cosine) and `raw` (projected-
space Fisher); K-FAC and EK-FAC on exact gradients; optimizer-aware curvature (AdamW's v̂,
diagonal on the full gradient as TrackStar does, or its rank-one Kronecker factorisation folded
into the random projection, both offline from the exact rows; Shampoo's Σ G Gᵀ, Σ Gᵀ G as
whitening factors through `run.use_kronecker_factors`); token-level re-ranking of the top
`--candidates` or of every document (`logix.Rerank`); the word-overlap baselines.

    .venv/bin/python examples/tiny_lm/retrieval.py    # ~9 min on 2 idle cores after training (~1.5 min)
    .venv/bin/python examples/tiny_lm/retrieval.py --entities 20 --epochs 20 --ranks 8 --d-model 32  # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

import logix
from logix.capture.kronecker import KroneckerFactors
from logix.capture.projection import gaussian_matrix

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
sys.path.insert(0, str(HERE))

from corpus import generate, overlap_scores  # noqa: E402
from fact_tracing import (  # noqa: E402
    add_model_arguments,
    document_batch,
    load_checkpoints,
    query_gradients,
    rank_metrics,
    save_checkpoints,
    sequence_losses,
    train,
)
from models import TinyDecoder  # noqa: E402

RAW_DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
WHITEN_DAMPINGS = (1e-6, 1e-5, 1e-4, 1e-3)
EKFAC_DAMPINGS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
WINDOWS = (1, 2)


def build_store(
    model, corpus, run_dir: Path, projection: dict, batch: int, statistics=("raw",), supplied=None
) -> Path:
    """Fit the projections when the kind needs it (one pass over the documents), or whiten by
    `supplied` = (Kronecker factors, power) instead; then log one row per document (its summed
    token loss)."""
    config = {
        "capture": {"types": ["Linear"], "loss_reduction": "mean", "attribution_only": True},
        "projection": projection,
        "curvature": {"statistics": list(statistics)},
    }
    if (run_dir / "manifest.json").exists():
        return run_dir
    docs = corpus.documents
    run = logix.init(run_dir, config=config, overwrite=True)
    run.watch(model)

    def one_pass():
        for start in range(0, len(docs), batch):
            chunk = docs[start : start + batch]
            b = document_batch(corpus, [d.text for d in chunk])
            with run(data_id=[d.doc_id for d in chunk], mask=b.pad_mask):
                sequence_losses(model, b).mean().backward()

    if supplied is not None:
        run.use_kronecker_factors(*supplied)
    elif projection["kind"] in ("pca", "kfac-whitened"):
        with run.fit_projections():
            one_pass()
    one_pass()
    run.finalize()
    return run_dir


def token_recompute(model, corpus, run_dir: Path, batch: int):
    """recompute(ids) for `rerank_top_k`: the documents' per-position gradients."""

    def recompute(ids):
        q = logix.init(run_dir, mode="query")
        q.watch(model)
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            b = document_batch(corpus, [corpus.documents[i].text for i in chunk])
            with q(data_id=list(chunk), mask=b.pad_mask, per_token=True, token_ids=b.tokens):
                sequence_losses(model, b).mean().backward()
        return q.token_gradients()

    return recompute


def memoised(recompute):
    """recompute(ids) that computes each document's per-position gradients once."""
    cache: dict = {}

    def cached(ids):
        todo = [i for i in ids if i not in cache]
        if todo:
            got = recompute(todo)
            cache.update({d: got.select([j]) for j, d in enumerate(got.data_ids)})
        return logix.TokenGradients.concatenate([cache[i] for i in ids])

    return cached


def kronecker_second_moments(
    v: dict[str, torch.Tensor], store
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adafactor's rank-one factorisation v ≈ r cᵀ / Σr of each module's [d_out, d_in(+1)] AdamW
    second moments (bias as the last column): (r [d_out], c [d_in]) scaled so that r cᵀ ≈ v."""
    out = {}
    for m in store.modules:
        w = v[f"{m.name}.weight"]
        if m.bias:
            w = torch.cat([w, v[f"{m.name}.bias"][:, None]], dim=1)
        r, c = w.sum(1), w.sum(0)
        out[m.name] = (r, c / r.sum())
    return out


def final_model(args: argparse.Namespace, console: Console) -> tuple:
    """(the trained model in eval mode, corpus, cache folder, AdamW second moments, Shampoo
    statistics): trained once, then read from the cache folder under `args.out`."""
    corpus = generate(n_entities=args.entities, seed=args.seed)
    torch.manual_seed(args.seed)
    model = TinyDecoder(len(corpus.vocab), args.d_model, args.layers, args.heads, max_len=128)
    key = (
        f"e{args.entities}-d{args.d_model}-l{args.layers}-h{args.heads}-ep{args.epochs}"
        f"-lr{args.lr}-b{args.batch}-s{args.seed}"
    )
    out = args.out / f"retrieval-{key}"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f for f in ("model.safetensors", "second_moments.safetensors", "shampoo.safetensors")]
    if all(f.exists() for f in files):
        final = load_checkpoints(files[0])[-1]
        v, shampoo = load_file(files[1]), load_file(files[2])
    else:  # the same seed and initialisation: a cached model of an older run is retrained bit for bit
        v, shampoo = {}, {}
        _, ckpts = train(
            model,
            corpus,
            args.epochs,
            args.lr,
            args.batch,
            args.seed,
            console,
            {args.epochs},
            second_moments=v,
            shampoo=shampoo,
        )
        final = ckpts[-1]
        if files[0].exists():
            old = load_checkpoints(files[0])[-1].state
            if any(not torch.equal(old[k], final.state[k]) for k in old):
                raise SystemExit(f"retraining did not reproduce {files[0]}: delete {out} and rerun")
        save_checkpoints(files[0], [final])
        for f, tensors in zip(files[1:], (v, shampoo)):
            save_file({k: t.contiguous() for k, t in tensors.items()}, f)
    model.load_state_dict(final.state)
    model.eval()
    return model, corpus, out, v, shampoo


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, entities=80, epochs=60)
    p.set_defaults(d_model=128)  # r = 64 per side is then 8.7% of the exact width
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    p.add_argument("--candidates", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    console, t0 = Console(), time.perf_counter()
    model, corpus, out, v, shampoo = final_model(args, console)
    questions = corpus.test_questions
    relevant = [corpus.fact_documents(q.fact) for q in questions]
    tune, report = list(range(0, len(questions), 2)), list(range(1, len(questions), 2))
    console.print(
        f"{len(corpus.documents)} documents, {len(questions)} held-out questions "
        f"({len(tune)} tune the choices, {len(report)} are reported)"
    )

    def metrics(scores: torch.Tensor, which: list[int]) -> dict:
        return rank_metrics(scores[which], [relevant[i] for i in which])

    rows: list[dict] = []

    def choose(name: str, candidates: dict, width: int | None = None) -> tuple:
        """candidates: {choice: scores [n_query, n_docs]}; the best tuning MRR is reported."""
        best = max(candidates, key=lambda c: metrics(candidates[c], tune)["mrr"])
        rows.append(
            {
                "setting": name,
                "choice": best,
                "width": width,
                "tune": metrics(candidates[best], tune),
                "report": metrics(candidates[best], report),
            }
        )
        console.print(f"  {name}: chose {best}, report MRR {rows[-1]['report']['mrr']:.3f}")
        return best, candidates[best]

    def cosine(store, grads, preconditioner: str, damping: float = 0.1) -> torch.Tensor:
        engine = logix.InfluenceEngine(store, preconditioner=preconditioner, damping=damping)
        return engine.scores(grads, mode="cosine").values

    # Exact gradients: identity projection, K-FAC factors for EK-FAC.
    exact_dir = build_store(
        model, corpus, out / "identity", {"kind": "identity"}, args.batch, statistics=("kfac",)
    )
    exact, exact_q = (
        logix.open_store(exact_dir),
        query_gradients(model, corpus, exact_dir, questions, args.batch),
    )
    full = exact.width
    choose("identity projection, identity", {"-": cosine(exact, exact_q, "identity")}, full)
    for pre in ("kfac", "ekfac"):
        found = {d: cosine(exact, exact_q, pre, d) for d in EKFAC_DAMPINGS}
        choose(f"identity projection, {pre}", found, full)
    # Optimizer-aware (offline, on the exact rows): AdamW's v̂^-alpha on both sides.
    x, q = exact.load().double(), exact_q.values.double()
    diag = torch.cat(
        [
            torch.cat([v[f"{m.name}.weight"], v[f"{m.name}.bias"][:, None]], 1).reshape(-1)
            if m.bias
            else v[f"{m.name}.weight"].reshape(-1)
            for m in exact.modules
        ]
    ).double()
    eps = 1e-12

    def offline_cosine(xr: torch.Tensor, qr: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(qr, dim=1) @ torch.nn.functional.normalize(xr, dim=1).T

    choose(
        "identity projection, AdamW v̂ diagonal (TrackStar)",
        {a: offline_cosine(x * (diag + eps) ** -a, q * (diag + eps) ** -a) for a in (0.25, 0.5)},
        full,
    )
    kron = kronecker_second_moments(v, exact)
    factors = {
        m.name: KroneckerFactors(shampoo[f"{m.name}.left"], shampoo[f"{m.name}.right"]) for m in exact.modules
    }
    stores = {}
    for rank in args.ranks:
        # Offline: the random projection of the raw and of the v̂-rescaled exact rows.
        def project(rows: torch.Tensor, alpha: float, rank: int = rank) -> torch.Tensor:
            blocks = []
            for m in exact.modules:
                b = rows[:, m.columns].reshape(-1, m.d_out, m.d_in)
                if alpha:
                    r, c = kron[m.name]
                    b = (
                        b
                        * (r.double() + eps)[None, :, None] ** -alpha
                        * (c.double() + eps)[None, None, :] ** -alpha
                    )
                po = gaussian_matrix(args.seed, m.name, "out", min(rank, m.d_out), m.d_out).double()
                pi = gaussian_matrix(args.seed, m.name, "in", min(rank, m.d_in), m.d_in).double()
                po = po if rank < m.d_out else torch.eye(m.d_out, dtype=torch.float64)
                pi = pi if rank < m.d_in else torch.eye(m.d_in, dtype=torch.float64)
                blocks.append((po @ b @ pi.T).reshape(rows.shape[0], -1))
            return torch.cat(blocks, 1)

        choose(
            f"random r={rank}, AdamW v̂ rank-one Kronecker, identity",
            {a: offline_cosine(project(x, a), project(q, a)) for a in (0.25, 0.5)},
        )
        for kind, dampings in (("random", (None,)), ("pca", (None,)), ("kfac-whitened", WHITEN_DAMPINGS)):
            found = {}
            for wd in dampings:
                proj = {"kind": kind, "rank_in": rank, "rank_out": rank, "seed": args.seed}
                if wd is not None:
                    proj["damping"] = wd
                d = build_store(
                    model, corpus, out / (f"{kind}-r{rank}" + (f"-w{wd}" if wd else "")), proj, args.batch
                )
                found[wd] = (logix.open_store(d), query_gradients(model, corpus, d, questions, args.batch), d)
            best_wd, _ = choose(
                f"{kind} r={rank}, identity",
                {wd: cosine(s, g, "identity") for wd, (s, g, _) in found.items()},
                found[dampings[0]][0].width,
            )
            s, g, d = found[best_wd]
            choose(f"{kind} r={rank}, raw", {dm: cosine(s, g, "raw", dm) for dm in RAW_DAMPINGS}, s.width)
            stores[(kind, rank)] = (s, g, d)
        # Optimizer-aware whitening: Shampoo's L, R (summed over the training steps) in place of
        # the fitted K-FAC factors (`run.use_kronecker_factors`), power and damping chosen on tune.
        found = {}
        for power in (0.5, 0.25):
            for wd in WHITEN_DAMPINGS:
                proj = {"kind": "kfac-whitened", "rank_in": rank, "rank_out": rank, "seed": args.seed}
                d = build_store(
                    model,
                    corpus,
                    out / f"shampoo-r{rank}-p{power}-w{wd}",
                    {**proj, "damping": wd},
                    args.batch,
                    supplied=(factors, power),
                )
                grads = query_gradients(model, corpus, d, questions, args.batch)
                found[(power, wd)] = cosine(logix.open_store(d), grads, "identity")
        choose(f"Shampoo-whitened r={rank}, identity", found, stores[("kfac-whitened", rank)][0].width)
    # Token-level re-ranking of the largest-rank stores and of the exact EK-FAC: the window's own
    # cosine (norm="window", the default) and its share of the document's (norm="sequence", the
    # whitened store only). The candidates are the top `--candidates` or every document; the
    # top-c list is the all-documents list restricted to the first stage's top c (the same scores).
    ekfac_damping = next(r["choice"] for r in rows if r["setting"] == "identity projection, ekfac")
    reranked = [
        (kind, max(args.ranks), "identity", 0.1, stores[(kind, max(args.ranks))])
        for kind in ("random", "kfac-whitened")
    ]
    reranked.append(("identity projection", None, "ekfac", ekfac_damping, (exact, exact_q, exact_dir)))
    n_docs = len(corpus.documents)
    for kind, rank, pre, damp, (s, g, d) in reranked:
        engine = logix.InfluenceEngine(s, preconditioner=pre, damping=damp)
        recompute = memoised(token_recompute(model, corpus, d, args.batch))
        first = engine.scores(g, mode="cosine").values
        in_first = torch.zeros_like(first, dtype=torch.bool)
        in_first.scatter_(1, first.topk(min(args.candidates, n_docs), dim=1).indices, True)
        for norm in ("window", "sequence") if kind == "kfac-whitened" else ("window",):
            found, started = {}, time.perf_counter()
            for w in WINDOWS:
                rerank = logix.Rerank(recompute, n_docs, w, norm, query_batch=len(questions))
                top = engine.top_k(g, k=n_docs, mode="cosine", rerank=rerank)
                scores = torch.full((len(questions), n_docs), -1e30, dtype=torch.float64)
                scores.scatter_(1, top.indices, top.values.double())
                found[(w, "all")] = scores
                found[(w, args.candidates)] = scores.masked_fill(~in_first, -1e30)  # others last
            name = f"{kind} r={rank}" if rank else kind
            for c in (args.candidates, "all"):
                one = {w: v for (w, cc), v in found.items() if cc == c}
                choose(f"{name}, {pre}, re-ranked top {c} (window; norm={norm})", one, s.width)
            console.print(f"    {len(WINDOWS)} windows re-ranked in {time.perf_counter() - started:.0f} s")
    choose("word overlap (question)", {"-": overlap_scores(corpus, [qq.prompt for qq in questions])})
    choose(
        "word overlap (question + answer)",
        {"-": overlap_scores(corpus, [f"{qq.prompt} {qq.answer}" for qq in questions])},
    )

    table = Table(
        title=f"fact retrieval on the final model: {len(report)} reported questions, "
        f"{len(corpus.documents)} documents, cosine"
    )
    for col in ("setting", "chosen on tune half", "MRR", "recall@10", "storage"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        table.add_row(
            r["setting"],
            str(r["choice"]),
            f"{r['report']['mrr']:.3f}",
            f"{r['report']['recall@10']:.3f}",
            f"{r['width'] / full:.1%}" if r["width"] else "-",
        )
    console.print(table)
    result = {
        "rows": rows,
        "documents": len(corpus.documents),
        "full_width": full,
        "seconds": time.perf_counter() - t0,
        "args": {k: str(a) if isinstance(a, Path) else a for k, a in vars(args).items()},
    }
    (args.out / "retrieval.json").write_text(json.dumps(result, indent=2, default=str))
    console.print(f"total {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
