"""Fact tracing with a tiny decoder-only transformer: do the documents that state a fact rank at
the top for a question about it?

1. Generate a corpus of facts about made-up people (`corpus.py`) and train a TinyDecoder on its
   documents plus training questions about *other* facts (they teach the question format).
2. Attribution passes (`capture.attribution_only`) over the final model and a few earlier
   checkpoints, one store segment each: one gradient row per document, batches padded on the
   right, with the padding mask (`with run(data_id=ids, mask=mask)`).
3. Capture the gradients of the held-out questions, the loss being that of the answer token(s)
   only, and rank the documents with every preconditioner × score mode, on the final model and
   summed over the checkpoints (TracIn-CP, weighted by the learning rate).
4. Report recall@10, hit@10 and MRR of the fact-stating documents against word-overlap
   baselines and random ranking. cosine and relative give the same ranking per query (they
   differ by the query's norm only); both are listed because both are API modes.

    .venv/bin/python examples/tiny_lm/fact_tracing.py            # ~3 minutes on 2 busy CPU cores
    .venv/bin/python examples/tiny_lm/fact_tracing.py --entities 30 --epochs 8 --d-model 32  # smoke
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import logix

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
sys.path.insert(0, str(HERE))

from corpus import VALUES, Corpus, Question, generate, overlap_scores, pad_batch
from models import TinyDecoder


@dataclass
class Batch:
    """Right-padded sequences: tokens [B, T], pad_mask [B, T] (1 = real token), and loss_mask
    [B, T] (1 where the token at that position is a target of the loss; position 0 never is)."""

    tokens: torch.Tensor
    pad_mask: torch.Tensor
    loss_mask: torch.Tensor


def document_batch(corpus: Corpus, texts: list[str]) -> Batch:
    """Every token after `<bos>` is a target (the whole document is the training example)."""
    tokens, mask = pad_batch([corpus.encode(t) for t in texts])
    loss_mask = mask.clone()
    loss_mask[:, 0] = 0
    return Batch(tokens, mask, loss_mask)


def question_batch(corpus: Corpus, questions: list[Question]) -> Batch:
    """Prompt followed by the answer; only the answer token(s) are targets."""
    seqs, loss_rows = [], []
    for q in questions:
        prompt, answer = corpus.encode(q.prompt), corpus.encode(q.answer)[1:]
        seqs.append(prompt + answer)
        loss_rows.append([0] * len(prompt) + [1] * len(answer))
    tokens, mask = pad_batch(seqs)
    loss_mask, _ = pad_batch(loss_rows)
    return Batch(tokens, mask, loss_mask)


def sequence_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Per-sequence loss [B]: the sum of the cross-entropies of its target tokens."""
    logits = model(batch.tokens, batch.pad_mask)  # [B, T, V]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.tokens[:, 1:], reduction="none")
    return (ce * batch.loss_mask[:, 1:]).sum(dim=1)  # [B]


@dataclass
class Checkpoint:
    """The model's weights at the end of an epoch, and the learning rate used then."""

    epoch: int
    lr: float
    state: dict[str, torch.Tensor]


def train(
    model: torch.nn.Module,
    corpus: Corpus,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    console: Console,
    keep: set[int],
    second_moments: dict[str, torch.Tensor] | None = None,
    shampoo: dict[str, torch.Tensor] | None = None,
) -> tuple[list[float], list[Checkpoint]]:
    """AdamW on the documents and the training questions (whole-sequence loss for both), with a
    linear warm-up and cosine decay. Returns the mean token loss of each epoch and the
    checkpoints at the end of the epochs in `keep` (1-based); `second_moments`, if a dict,
    receives AdamW's bias-corrected second moments v̂ per parameter name at the end; `shampoo`, if
    a dict, Shampoo's statistics of every nn.Linear, summed over the steps: `{name}.left` Σ G Gᵀ
    [d_out, d_out] and `{name}.right` Σ Gᵀ G [d_in + 1, d_in + 1] of the mini-batch gradient
    G = [∇W, ∇b] (bias column last, logix's row convention)."""
    texts = [d.text for d in corpus.documents]
    texts += [f"{q.prompt} {q.answer}" for q in corpus.train_questions]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    steps = epochs * ((len(texts) + batch_size - 1) // batch_size)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())
        ),
    )
    rng = random.Random(seed)
    history, checkpoints = [], []
    for epoch in range(epochs):
        epoch_lr = opt.param_groups[0]["lr"]
        order = list(range(len(texts)))
        rng.shuffle(order)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = document_batch(corpus, [texts[i] for i in order[start : start + batch_size]])
            loss = sequence_losses(model, batch).sum() / batch.loss_mask.sum()
            loss.backward()
            if shampoo is not None:
                accumulate_shampoo(model, shampoo)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item() * float(batch.loss_mask.sum())
            count += int(batch.loss_mask.sum())
        history.append(total / count)
        if epoch % max(1, epochs // 8) == 0 or epoch == epochs - 1:
            console.print(f"  epoch {epoch + 1:3d}/{epochs}: token loss {history[-1]:.3f}")
        if epoch + 1 in keep:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            checkpoints.append(Checkpoint(epoch + 1, epoch_lr, state))
    if second_moments is not None:
        beta2 = opt.param_groups[0]["betas"][1]
        for name, p in model.named_parameters():
            state = opt.state[p]
            steps_done = float(state["step"])
            second_moments[name] = state["exp_avg_sq"].detach().clone() / (1 - beta2**steps_done)
    return history, checkpoints


@torch.no_grad()
def accumulate_shampoo(model: torch.nn.Module, stats: dict[str, torch.Tensor]) -> None:
    """Add this step's G Gᵀ and Gᵀ G of every nn.Linear to `stats` (see `train`)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.weight.grad is not None:
            g = module.weight.grad
            if module.bias is not None:
                g = torch.cat([g, module.bias.grad[:, None]], dim=1)
            g = g.double()
            for side, c in (("left", g @ g.T), ("right", g.T @ g)):
                key = f"{name}.{side}"
                stats[key] = stats[key] + c if key in stats else c


def save_checkpoints(path: Path, checkpoints: list[Checkpoint]) -> None:
    tensors = {f"{c.epoch}/{k}": v.contiguous() for c in checkpoints for k, v in c.state.items()}
    meta = {"checkpoints": json.dumps([[c.epoch, c.lr] for c in checkpoints])}
    save_file(tensors, path, metadata=meta)


def load_checkpoints(path: Path) -> list[Checkpoint]:
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        listed = json.loads(f.metadata()["checkpoints"])
    out = []
    for epoch, lr in listed:
        prefix = f"{epoch}/"
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        out.append(Checkpoint(epoch, lr, state))
    return out


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, corpus: Corpus, questions: list[Question]) -> torch.Tensor:
    """[n] bool: the greedy (argmax) prediction equals every answer token."""
    batch = question_batch(corpus, questions)
    pred = model(batch.tokens, batch.pad_mask)[:, :-1].argmax(-1)  # [B, T-1]
    target = batch.loss_mask[:, 1:].bool()
    wrong = (pred != batch.tokens[:, 1:]) & target
    return ~wrong.any(dim=1)


def log_documents(
    model: torch.nn.Module,
    corpus: Corpus,
    run_dir: Path,
    config: dict,
    batch_size: int,
    checkpoints: list[Checkpoint],
) -> None:
    """Attribution passes: per checkpoint (one store segment each), one gradient row per
    document (its summed token loss), in padded batches."""
    run = logix.init(run_dir, config=config, overwrite=True)
    run.watch(model)
    docs = corpus.documents
    for ckpt in checkpoints:
        model.load_state_dict(ckpt.state)
        run.start_segment(segment_name(ckpt), epoch=ckpt.epoch, lr=ckpt.lr)
        for start in range(0, len(docs), batch_size):
            chunk = docs[start : start + batch_size]
            batch = document_batch(corpus, [d.text for d in chunk])
            with run(data_id=[d.doc_id for d in chunk], mask=batch.pad_mask):
                sequence_losses(model, batch).mean().backward()
    run.finalize()


def segment_name(ckpt: Checkpoint) -> str:
    return f"epoch-{ckpt.epoch}"


def query_gradients(
    model: torch.nn.Module, corpus: Corpus, run_dir: Path, questions: list[Question], batch_size: int
) -> logix.Gradients:
    """Gradients [n_query, D] of each question's answer-token loss."""
    q = logix.init(run_dir, mode="query")
    q.watch(model)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        batch = question_batch(corpus, chunk)
        with q(data_id=list(range(start, start + len(chunk))), mask=batch.pad_mask):
            sequence_losses(model, batch).mean().backward()
    return q.gradients()


def rank_metrics(scores: torch.Tensor, relevant: list[list[int]], k: int = 10) -> dict[str, float]:
    """scores [n_query, n_docs] (higher = more relevant; row i of docs is doc id i).

    recall@k: fraction of a query's relevant documents in its top k, averaged over queries;
    hit@k: at least one of them is; MRR: mean of 1 / rank of the first relevant document.
    """
    order = scores.argsort(dim=1, descending=True)  # [n_query, n_docs]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))  # rank of each doc
    recall, hit, rr = [], [], []
    for i, rel in enumerate(relevant):
        r = ranks[i, rel]
        recall.append(float((r < k).float().mean()))
        hit.append(float((r < k).any()))
        rr.append(1.0 / (float(r.min()) + 1.0))
    n = len(relevant)
    return {f"recall@{k}": sum(recall) / n, f"hit@{k}": sum(hit) / n, "mrr": sum(rr) / n}


def add_model_arguments(p: argparse.ArgumentParser, entities: int, epochs: int) -> None:
    """The corpus, model, training and projection options shared by the tiny-LM scripts."""
    p.add_argument("--entities", type=int, default=entities, help="made-up people (4 facts each)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=32, help="LoGra rank per side (rank_in = rank_out)")
    p.add_argument("--damping", type=float, default=0.1, help="relative damping of `raw`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "out")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, entities=80, epochs=60)
    p.add_argument("--embedding", action="store_true", help="watch the token embedding too")
    p.add_argument(
        "--include",
        nargs="+",
        default=["*"],
        help="module-name patterns to watch, e.g. 'blocks.*.fc*' (default all)",
    )
    p.add_argument(
        "--checkpoints",
        type=int,
        default=4,
        help="checkpoints (evenly spaced epochs, the last the final model) for TracIn-CP",
    )
    p.add_argument("--retrain", action="store_true", help="ignore a cached trained model")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    console = Console()
    t0 = time.perf_counter()
    corpus = generate(n_entities=args.entities, seed=args.seed)
    console.print(
        f"corpus: {len(corpus.entities)} people, {len(corpus.facts)} facts, "
        f"{len(corpus.documents)} documents, {len(corpus.train_questions)} training questions, "
        f"{len(corpus.test_questions)} held-out questions, vocabulary {len(corpus.vocab)}"
    )

    torch.manual_seed(args.seed)
    model = TinyDecoder(len(corpus.vocab), args.d_model, args.layers, args.heads, max_len=128)
    # Checkpoints at evenly spaced epochs, the last one the final model. They are cached
    # (safetensors) by the training arguments, so attribution settings can be explored without
    # retraining.
    keep = sorted({round(args.epochs * (i + 1) / args.checkpoints) for i in range(args.checkpoints)})
    key = (
        f"e{args.entities}-d{args.d_model}-l{args.layers}-h{args.heads}-ep{args.epochs}"
        f"-lr{args.lr}-b{args.batch}-s{args.seed}-c{'_'.join(map(str, keep))}"
    )
    cache = args.out / f"model-{key}.safetensors"
    if cache.exists() and not args.retrain:
        checkpoints = load_checkpoints(cache)
        history = [float("nan")]
        console.print(f"loaded the trained checkpoints from {cache}")
    else:
        console.print(f"training TinyDecoder d={args.d_model} layers={args.layers} for {args.epochs} epochs")
        history, checkpoints = train(
            model, corpus, args.epochs, args.lr, args.batch, args.seed, console, set(keep)
        )
        args.out.mkdir(parents=True, exist_ok=True)
        save_checkpoints(cache, checkpoints)
    model.load_state_dict(checkpoints[-1].state)
    model.eval()
    train_acc = answer_accuracy(model, corpus, corpus.train_questions)
    test_acc = answer_accuracy(model, corpus, corpus.test_questions)
    majority = _majority_accuracy(corpus)
    t_train = time.perf_counter() - t0
    console.print(
        f"answer accuracy: training questions {train_acc.float().mean():.3f}, held-out questions "
        f"{test_acc.float().mean():.3f} (most frequent value per relation: {majority:.3f}); "
        f"{t_train:.0f} s"
    )

    types = ["Linear", "Embedding"] if args.embedding else ["Linear"]
    config = {
        "capture": {
            "types": types,
            "include": args.include,
            "loss_reduction": "mean",
            "attribution_only": True,
        },
        "projection": {"kind": "random", "rank_in": args.rank, "rank_out": args.rank, "seed": args.seed},
    }
    run_dir = args.out / "store"
    log_documents(model, corpus, run_dir, config, args.batch, checkpoints)
    questions = corpus.test_questions
    grads = {}  # per checkpoint: the queries' gradients under that checkpoint's weights
    for ckpt in checkpoints:
        model.load_state_dict(ckpt.state)
        grads[ckpt.epoch] = query_gradients(model, corpus, run_dir, questions, args.batch)
    model.load_state_dict(checkpoints[-1].state)
    store = logix.open_store(run_dir, segment=segment_name(checkpoints[-1]))
    assert list(store.data_ids) == [d.doc_id for d in corpus.documents]
    console.print(
        f"logged {len(store)} documents × {store.width} columns at epochs "
        f"{[c.epoch for c in checkpoints]}; {len(questions)} queries"
    )

    relevant = [corpus.fact_documents(q.fact) for q in questions]
    correct = test_acc.nonzero().flatten().tolist()
    rows: list[tuple[str, dict, dict]] = []

    def add(name: str, scores: torch.Tensor) -> None:
        rows.append(
            (
                name,
                rank_metrics(scores, relevant),
                rank_metrics(scores[correct], [relevant[i] for i in correct]) if correct else {},
            )
        )

    final = checkpoints[-1]
    for preconditioner in ("identity", "raw"):
        engine = logix.InfluenceEngine(store, preconditioner=preconditioner, damping=args.damping)
        for mode in ("dot", "cosine", "relative"):
            add(f"logix {preconditioner} / {mode}", engine.scores(grads[final.epoch], mode=mode).values)
            if len(checkpoints) > 1:
                # TracIn-CP: the learning-rate weighted sum of the scores at every checkpoint,
                # each segment scored with the queries captured under that checkpoint's weights.
                combined = logix.combined_scores(
                    run_dir,
                    {segment_name(c): grads[c.epoch] for c in checkpoints},
                    mode=mode,
                    preconditioner=preconditioner,
                    damping=args.damping,
                )
                assert combined.train_ids == [d.doc_id for d in corpus.documents]
                add(f"logix {preconditioner} / {mode}, TracIn-CP {len(checkpoints)} ckpts", combined.values)
    engine = logix.InfluenceEngine(store, preconditioner="raw", damping=args.damping)
    top = engine.top_k(grads[final.epoch], k=10, mode="cosine")  # streaming top-k = full scores
    full = engine.scores(grads[final.epoch], mode="cosine").values
    assert torch.equal(top.indices[:, 0], full.argmax(dim=1))
    # A single earlier checkpoint: its documents' fact tokens are not memorised yet (see the
    # loss shares printed below), so its gradients still carry the facts.
    for ckpt in checkpoints[:-1]:
        for preconditioner in ("identity", "raw"):
            engine = logix.InfluenceEngine(
                store.select(segment_name(ckpt)), preconditioner=preconditioner, damping=args.damping
            )
            add(
                f"logix {preconditioner} / cosine, epoch {ckpt.epoch} alone",
                engine.scores(grads[ckpt.epoch], mode="cosine").values,
            )
    add("word overlap (question)", overlap_scores(corpus, [q.prompt for q in questions]))
    add(
        "word overlap (question + answer)",
        overlap_scores(corpus, [f"{q.prompt} {q.answer}" for q in questions]),
    )
    gen = torch.Generator().manual_seed(args.seed)
    add("random", torch.rand(len(questions), len(corpus.documents), generator=gen, dtype=torch.float64))

    shares = {}
    for ckpt in checkpoints:
        model.load_state_dict(ckpt.state)
        shares[ckpt.epoch] = loss_shares(model, corpus)
        accuracy = float(answer_accuracy(model, corpus, questions).float().mean())
        console.print(
            f"epoch {ckpt.epoch}: held-out answer accuracy {accuracy:.3f}; share of the documents' "
            f"loss on fact values {shares[ckpt.epoch]['values']:.2f}, on names "
            f"{shares[ckpt.epoch]['names']:.2f}"
        )
    model.load_state_dict(final.state)

    table = Table(
        title=f"fact tracing: {len(questions)} held-out questions, "
        f"{len(corpus.documents)} documents (1-3 state each fact)"
    )
    table.add_column("ranking", no_wrap=True)
    for col in ("recall@10", "hit@10", "MRR"):
        table.add_column(col, justify="right")
    table.add_column(f"MRR, answered right ({len(correct)})", justify="right")
    for name, m, mc in rows:
        table.add_row(
            name,
            f"{m['recall@10']:.3f}",
            f"{m['hit@10']:.3f}",
            f"{m['mrr']:.3f}",
            f"{mc['mrr']:.3f}" if mc else "-",
        )
    console.print(table)
    elapsed = time.perf_counter() - t0
    console.print(f"total {elapsed:.0f} s")

    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "final_token_loss": history[-1],
        "document_loss_shares": shares,
        "answer_accuracy": {
            "train_questions": float(train_acc.float().mean()),
            "held_out_questions": float(test_acc.float().mean()),
            "majority": majority,
        },
        "rankings": {name: {"all": m, "answered_right": mc} for name, m, mc in rows},
        "seconds": elapsed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fact_tracing.json").write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def loss_shares(model: torch.nn.Module, corpus: Corpus) -> dict[str, float]:
    """Which tokens carry the documents' loss: the fractions on attribute values (the facts),
    on entity names (unpredictable: a document's subject is not known in advance) and on the
    rest. Once the values are memorised, a document's gradient is mostly its names'."""
    values = {corpus.index[v] for vs in VALUES.values() for v in vs if v in corpus.index}
    names = {corpus.index[e] for e in corpus.entities}
    batch = document_batch(corpus, [d.text for d in corpus.documents])
    logits = model(batch.tokens, batch.pad_mask)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.tokens[:, 1:], reduction="none")
    ce = ce * batch.loss_mask[:, 1:]
    target = batch.tokens[:, 1:]
    is_value = torch.isin(target, torch.tensor(sorted(values)))
    is_name = torch.isin(target, torch.tensor(sorted(names)))
    total = float(ce.sum())
    return {
        "values": float(ce[is_value].sum()) / total,
        "names": float(ce[is_name].sum()) / total,
        "other": float(ce[~is_value & ~is_name].sum()) / total,
    }


def _majority_accuracy(corpus: Corpus) -> float:
    """Accuracy on the held-out questions of always answering the relation's most frequent value
    among the training questions."""
    counts: dict[str, dict[str, int]] = {}
    for q in corpus.train_questions:
        c = counts.setdefault(q.fact.relation, {})
        c[q.answer] = c.get(q.answer, 0) + 1
    best = {r: max(c, key=c.get) for r, c in counts.items()}
    hits = [best.get(q.fact.relation) == q.answer for q in corpus.test_questions]
    return sum(hits) / len(hits)


if __name__ == "__main__":
    main()
