"""Token-level attribution on the tiny-LM fact corpus: which words of the top document carry its
influence on a question?

1. Train (or load) the TinyDecoder of `fact_tracing.py` on the generated fact corpus and log one
   gradient row per document (the same attribution pass as `fact_tracing.py`).
2. Query with the answer's log-probability (`measurements.completion_loss`: a positive score
   means "makes the right answer more likely") and take each question's top document.
3. Recompute those documents' per-position factors (`per_token=True`) and split each score over
   the positions (`engine.token_scores`). The positions' terms sum to the document's score.
4. Print, for a few questions, the positions with the largest terms, and count how often the
   largest one is where the document states the answer: the position whose next token is the
   answer value (in a causal LM the term at position t holds the prediction of token t+1).

    .venv/bin/python examples/tiny_lm/token_attribution.py            # ~2 minutes on 2 busy cores
    .venv/bin/python examples/tiny_lm/token_attribution.py --entities 20 --epochs 20  # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

import logix
from logix import measurements

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
sys.path.insert(0, str(HERE))

from corpus import generate  # noqa: E402
from fact_tracing import (  # noqa: E402
    add_model_arguments,
    answer_accuracy,
    document_batch,
    load_checkpoints,
    log_documents,
    question_batch,
    save_checkpoints,
    segment_name,
    sequence_losses,
    train,
)
from models import TinyDecoder  # noqa: E402


def highlighted(tokens, own: torch.Tensor, vocab: list[str], i: int) -> logix.render.Html:
    """Query i's top document, each token coloured by its position's score for query i."""
    n = int(tokens.mask[i].sum())
    words = [vocab[t] for t in tokens.token_ids[i][:n].tolist()]
    return logix.render.tokens(words, own[i, :n])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, entities=40, epochs=40)
    p.add_argument(
        "--mode",
        default="relative",
        choices=["dot", "cosine", "relative"],
        help="score mode of the ranking and of the position terms",
    )
    p.add_argument("--show", type=int, default=6, help="questions whose top document is printed")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    console = Console()
    t0 = time.perf_counter()
    corpus = generate(n_entities=args.entities, seed=args.seed)
    torch.manual_seed(args.seed)
    model = TinyDecoder(len(corpus.vocab), args.d_model, args.layers, args.heads, max_len=128)
    key = (
        f"e{args.entities}-d{args.d_model}-l{args.layers}-h{args.heads}-ep{args.epochs}"
        f"-lr{args.lr}-b{args.batch}-s{args.seed}"
    )
    cache = args.out / f"token-model-{key}.safetensors"
    if cache.exists():
        checkpoint = load_checkpoints(cache)[-1]
        console.print(f"loaded the trained model from {cache}")
    else:
        console.print(
            f"training TinyDecoder d={args.d_model} layers={args.layers}, {args.epochs} epochs, "
            f"{len(corpus.documents)} documents"
        )
        _, checkpoints = train(
            model, corpus, args.epochs, args.lr, args.batch, args.seed, console, {args.epochs}
        )
        checkpoint = checkpoints[-1]
        args.out.mkdir(parents=True, exist_ok=True)
        save_checkpoints(cache, [checkpoint])
    model.load_state_dict(checkpoint.state)
    model.eval()
    # Questions the model answers right: their answer was learnt from the documents.
    right = answer_accuracy(model, corpus, corpus.test_questions)
    questions = [q for q, ok in zip(corpus.test_questions, right.tolist()) if ok]
    console.print(f"held-out questions answered right: {len(questions)} of {len(corpus.test_questions)}")
    if not questions:
        questions = corpus.test_questions
        console.print("none: attributing all held-out questions (train longer for meaningful tokens)")

    config = {
        "capture": {"types": ["Linear", "Embedding"], "loss_reduction": "mean", "attribution_only": True},
        "projection": {"kind": "random", "rank_in": args.rank, "rank_out": args.rank, "seed": args.seed},
    }
    run_dir = args.out / "token-store"
    log_documents(model, corpus, run_dir, config, args.batch, [checkpoint])
    store = logix.open_store(run_dir, segment=segment_name(checkpoint))

    query = logix.init(run_dir, mode="query")
    query.watch(model)
    for start in range(0, len(questions), args.batch):
        chunk = questions[start : start + args.batch]
        qb = question_batch(corpus, chunk)
        with query(data_id=list(range(start, start + len(chunk))), mask=qb.pad_mask):
            logits = model(qb.tokens, qb.pad_mask)
            answer = measurements.completion_loss(logits, qb.tokens, qb.loss_mask)  # -log p(answer)
            measurements.reduce(answer, query).backward()
    q = query.gradients()
    engine = logix.InfluenceEngine(store, preconditioner="raw", damping=args.damping)
    top = engine.top_k(q, k=1, mode=args.mode)
    top_docs = [corpus.documents[store.data_ids.index(row[0])] for row in top.train_ids]

    # Recompute the top documents position by position (one document per query).
    for start in range(0, len(top_docs), args.batch):
        chunk = top_docs[start : start + args.batch]
        b = document_batch(corpus, [d.text for d in chunk])
        with query(
            data_id=[f"{start + i}:{d.doc_id}" for i, d in enumerate(chunk)],
            mask=b.pad_mask,
            per_token=True,
            token_ids=b.tokens,
        ):
            sequence_losses(model, b).mean().backward()
    tokens = query.token_gradients()
    ts = engine.token_scores(q, tokens, mode=args.mode)
    diagonal = torch.arange(len(questions))
    own = ts.values[diagonal, diagonal]  # [n_query, T]: query i against its own top document
    gap = (own.sum(-1) - top.values[:, 0]).abs().max() / top.values[:, 0].abs().max()

    vocab = corpus.vocab
    stated = hit_value = hit_fact = value_anywhere = 0
    shown = 0
    for i, (question, doc) in enumerate(zip(questions, top_docs)):
        ids = tokens.token_ids[i]
        n = int(tokens.mask[i].sum())
        scores = own[i, :n]
        words = [vocab[t] for t in ids[:n].tolist()]
        best = int(scores.argmax())
        nxt = words[best + 1] if best + 1 < n else "<end>"
        states = question.fact in doc.facts
        value_anywhere += nxt == question.answer
        stated += states
        if states:
            hit_value += nxt == question.answer
            hit_fact += bool({words[best], nxt} & {question.fact.entity, question.answer})
        if shown < args.show:
            shown += 1
            console.print(
                f"\n[bold]{question.prompt} {question.answer}[/bold]  top document "
                f"{doc.doc_id} ({'states the fact' if states else 'does not state it'}), "
                f"score {float(top.values[i, 0]):.3g} = Σ positions {float(scores.sum()):.3g}"
            )
            console.print("  " + doc.text)
            # Terms of both signs cancel, so each is shown with its share of Σ|terms|.
            order = scores.argsort(descending=True)[:4].tolist()
            total = float(scores.abs().sum())
            for rank, t in enumerate(order):
                target = words[t + 1] if t + 1 < n else "<end>"
                console.print(
                    f"  {rank + 1}. position {t:2d}: {words[t]!r} → {target!r}  "
                    f"{float(scores[t]):+.3g} ({float(scores[t]) / total:.0%} of Σ|terms|)"
                )
    page = top.report(
        args.out / "token-report.html",
        render=lambda doc_id, query_id: highlighted(tokens, own, vocab, int(query_id)),
        render_query=lambda i: f"{questions[int(i)].prompt} {questions[int(i)].answer}",
        title="Which positions of the top document made the model answer?",
    )
    console.print(f"token highlights of each question's top document: {page}")
    elapsed = time.perf_counter() - t0
    console.print(
        f"\n{len(questions)} questions ({args.mode}); the top document states the fact for {stated}. "
        f"Among those, the largest position term is the prediction of the answer value for "
        f"{hit_value} ({hit_value / max(stated, 1):.0%}); its token or next token is the entity's name "
        f"or the value for {hit_fact} ({hit_fact / max(stated, 1):.0%}). Over all top documents, the "
        f"largest term predicts the answer value for {value_anywhere} of {len(questions)}. Positions "
        f"sum to the sequence scores within {float(gap):.1e} (relative). {elapsed:.0f} s"
    )
    result = {
        "questions": len(questions),
        "mode": args.mode,
        "top_document_states_fact": stated,
        "largest_term_predicts_answer": hit_value,
        "largest_term_at_entity_or_value": hit_fact,
        "largest_term_predicts_answer_any_document": value_anywhere,
        "sum_relative_gap": float(gap),
        "seconds": elapsed,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    (args.out / "token_attribution.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
