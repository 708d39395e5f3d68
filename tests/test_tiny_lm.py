"""The tiny-LM fact-tracing example: a deterministic corpus with consistent ground truth, and
padded sequences logged exactly (a padded document's row equals its unpadded gradient)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import logix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "tiny_lm"))

import corpus as C  # noqa: E402
from fact_tracing import (  # noqa: E402
    Batch,
    document_batch,
    question_batch,
    rank_metrics,
    sequence_losses,
)
from models import TinyDecoder  # noqa: E402


def small_corpus(seed: int = 3) -> C.Corpus:
    return C.generate(n_entities=10, seed=seed)


def test_corpus_is_deterministic():
    a, b = small_corpus(), small_corpus()
    assert [d.text for d in a.documents] == [d.text for d in b.documents]
    assert [d.facts for d in a.documents] == [d.facts for d in b.documents]
    assert a.facts == b.facts and a.vocab == b.vocab
    assert [q.prompt for q in a.test_questions] == [q.prompt for q in b.test_questions]
    assert [d.text for d in small_corpus(4).documents] != [d.text for d in a.documents]


def stated(fact: C.Fact, text: str) -> bool:
    return any(t.format(e=fact.entity, v=fact.value) in text for t in C.STATEMENTS[fact.relation])


def test_ground_truth_is_consistent():
    c = small_corpus()
    assert len(set(c.entities)) == 10 and len(c.facts) == 10 * len(C.RELATIONS)
    assert [d.doc_id for d in c.documents] == list(range(len(c.documents)))
    for fact in c.facts:
        docs = c.fact_documents(fact)
        assert 1 <= len(docs) <= 3
        for d in c.documents:
            # a document states a fact exactly when its ground truth says so
            assert stated(fact, d.text) == (d.doc_id in docs), (fact, d.text)
    assert any(not d.facts for d in c.documents)  # distractors exist
    lengths = {len(d.text.split()) for d in c.documents}
    assert max(lengths) > 2 * min(lengths)  # lengths vary, so batches are padded
    asked = [q.fact for q in c.train_questions + c.test_questions]
    assert sorted(asked, key=str) == sorted(c.facts, key=str)  # every fact asked exactly once
    assert not {q.fact for q in c.train_questions} & {q.fact for q in c.test_questions}
    for q in c.test_questions:
        assert q.answer == q.fact.value and q.fact.entity in q.prompt.split()
        assert q.answer not in q.prompt.split()
    for d in c.documents:
        c.encode(d.text)  # every word is in the vocabulary


def test_overlap_baseline_and_metrics():
    c = small_corpus()
    q = c.test_questions[0]
    s = C.overlap_scores(c, [q.prompt])
    best = int(s[0].argmax())
    assert q.fact.entity in c.documents[best].text.split()
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    m = rank_metrics(scores, [[2, 3]], k=2)
    assert m["recall@2"] == 0.5 and m["hit@2"] == 1.0 and m["mrr"] == 0.5


def exact_row(model: nn.Module, modules: list, batch: Batch) -> torch.Tensor:
    """The store row of one unpadded sequence by plain autograd: per watched module its weight
    gradient as [d_out, d_in] (bias as the last column; an Embedding's map is weightᵀ)."""
    named = dict(model.named_modules())
    params = []
    for m in modules:
        params.append(named[m.name].weight)
        if m.bias:
            params.append(named[m.name].bias)
    grads = iter(torch.autograd.grad(sequence_losses(model, batch).sum(), params))
    blocks = []
    for m in modules:
        g = next(grads)
        if m.type == "Embedding":
            g = g.T
        if m.bias:
            g = torch.cat([g, next(grads)[:, None]], dim=1)
        assert g.shape == (m.d_out, m.d_in)
        blocks.append(g.reshape(-1))
    return torch.cat(blocks)


def test_padded_rows_equal_unpadded_gradients(tmp_path):
    torch.manual_seed(0)
    c = small_corpus()
    model = TinyDecoder(len(c.vocab), d_model=16, n_layers=1, n_heads=2, max_len=64)
    docs = sorted(c.documents, key=lambda d: len(d.text.split()))
    docs = [docs[0], docs[-1], docs[len(docs) // 2]]  # short, long, middle: real padding
    config = {
        "capture": {"types": ["Linear", "Embedding"], "loss_reduction": "mean", "attribution_only": True},
        "projection": {"kind": "identity"},
        "curvature": {"statistics": []},
    }
    run = logix.init(tmp_path / "r", config=config)
    run.watch(model)
    batch = document_batch(c, [d.text for d in docs])
    assert (batch.pad_mask == 0).any()
    with run(data_id=[d.doc_id for d in docs], mask=batch.pad_mask):
        sequence_losses(model, batch).mean().backward()
    run.finalize()
    store = logix.open_store(tmp_path / "r")
    rows = dict(zip(store.data_ids, store.load()))
    assert any(m.type == "Embedding" for m in store.modules)
    for d in docs:
        expected = exact_row(model, store.modules, document_batch(c, [d.text]))
        torch.testing.assert_close(rows[d.doc_id], expected, rtol=1e-4, atol=1e-6)

    # Queries: the answer-token loss only, padded too; same check on the query side.
    questions = sorted(c.test_questions, key=lambda q: len(q.prompt.split()))[::3][:3]
    q = logix.init(tmp_path / "r", mode="query")
    q.watch(model)
    qb = question_batch(c, questions)
    assert (qb.pad_mask == 0).any() and int(qb.loss_mask.sum()) == len(questions)
    with q(data_id=[0, 1, 2], mask=qb.pad_mask):
        sequence_losses(model, qb).mean().backward()
    got = q.gradients().values
    for i, question in enumerate(questions):
        expected = exact_row(model, store.modules, question_batch(c, [question]))
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-6)
    for p in model.parameters():  # attribution-only mode leaves the model as it was
        assert p.requires_grad and p.grad is None


@pytest.mark.parametrize("seed", [0, 1])
def test_generate_sizes(seed):
    c = C.generate(n_entities=15, seed=seed)
    assert len(c.train_questions) + len(c.test_questions) == len(c.facts)
    assert len(c.test_questions) == 15 * (len(C.RELATIONS) - len(C.RELATIONS) // 2)


def test_fact_tracing_script_runs_end_to_end(tmp_path):
    """The example on a tiny setting: every ranking is reported, with metrics in range, and the
    document-loss shares add up to one per checkpoint."""
    import fact_tracing

    result = fact_tracing.main(
        [
            "--entities",
            "8",
            "--epochs",
            "2",
            "--d-model",
            "16",
            "--checkpoints",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    names = list(result["rankings"])
    assert "logix raw / cosine" in names and "word overlap (question)" in names
    assert sum("TracIn-CP" in n for n in names) == 6  # 2 preconditioners × 3 modes
    assert any("epoch 1 alone" in n for n in names)
    for metrics in result["rankings"].values():
        assert all(0.0 <= v <= 1.0 for v in metrics["all"].values())
    for shares in result["document_loss_shares"].values():
        assert abs(sum(shares.values()) - 1.0) < 1e-6
    assert (tmp_path / "fact_tracing.json").exists()
