"""Measurement functions: their values, their query gradients against torch.func per-example
gradients, and the sign convention (a log-probability query is a loss query negated)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import (
    C,
    TinyDecoder,
    log_documents,
    question_batch,
    sequence_losses,
)
from reference import per_example_grads, projected_rows
from torch import nn

import logix
from logix import measurements as M


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.out = nn.Linear(4, vocab)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)))


def test_values():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2])
    p = logits.softmax(1)[torch.arange(5), labels]
    torch.testing.assert_close(M.margin(logits, labels), torch.log(p / (1 - p)))
    torch.testing.assert_close(M.margin_loss(logits, labels), -torch.log(p / (1 - p)))
    torch.testing.assert_close(M.cross_entropy(logits, labels), -torch.log(p))
    seq = torch.randn(2, 5, 7, generator=gen)
    ids = torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    logp = seq.log_softmax(-1)
    want = torch.stack([logp[0, 1, ids[0, 2]] + logp[0, 2, ids[0, 3]], logp[1, 3, ids[1, 4]]])
    torch.testing.assert_close(M.completion_logprob(seq, ids, mask), want)
    torch.testing.assert_close(M.completion_loss(seq, ids, mask), -want)
    labels = torch.where(mask[:, 1:] == 1, ids[:, 1:], M.IGNORE_INDEX)
    torch.testing.assert_close(M.cross_entropy(seq[:, :-1], labels), -want)
    torch.testing.assert_close(M.squared_error(seq, torch.zeros_like(seq)), seq.pow(2).sum((1, 2)))
    with pytest.raises(ValueError, match=r"completion_mask\[:, 0\]"):
        M.completion_logprob(seq, ids, torch.ones_like(mask))
    with pytest.raises(ValueError, match="margin takes"):
        M.margin(seq, ids)
    with pytest.raises(ValueError, match="per-example"):
        M.reduce(seq, None)


def query_rows(tmp_path, model, inputs, measure, config) -> tuple[torch.Tensor, logix.Run]:
    with logix.init(tmp_path / "r", config=config) as run:
        run.watch(model)
    query = logix.init(tmp_path / "r", mode="query")
    query.watch(model)
    with query(data_id=list(range(inputs.shape[0]))):
        M.reduce(measure(model(inputs)), query).backward()
    return query.gradients().values, query


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_margin_query_gradients_match_torch_func(tmp_path, reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    config = {
        "capture": {"loss_reduction": reduction},
        "projection": {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 4},
    }
    got, query = query_rows(tmp_path, model, x, lambda out: M.margin_loss(out, y), config)
    grads = per_example_grads(model, lambda o, t: M.margin_loss(o, t).sum(), (x,), y)
    projections = query.projections
    want = projected_rows(model, query.modules, projections, grads)
    assert (got.double() - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_completion_query_gradients_match_torch_func(tmp_path, reduction):
    torch.manual_seed(1)
    model = TinyLM()
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 11, (5, 6), generator=gen)
    mask = torch.zeros(5, 6, dtype=torch.long)
    for i, (a, b) in enumerate([(3, 6), (1, 2), (5, 6), (2, 5), (4, 6)]):
        mask[i, a:b] = 1
    config = {
        "capture": {"loss_reduction": reduction},
        "projection": {"kind": "random", "rank_in": 5, "rank_out": 3, "seed": 4},
    }
    got, query = query_rows(tmp_path, model, tokens, lambda out: M.completion_loss(out, tokens, mask), config)
    both = torch.stack([tokens, mask], dim=1)  # [B, 2, T]: input ids and completion mask

    def nll(out, t):  # the completion's negative log-likelihood, written out independently
        ids, m = t[:, 0], t[:, 1]
        logp = torch.log_softmax(out[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
        return -(logp * m[:, 1:]).sum()

    grads = per_example_grads(model, nll, (tokens,), both)
    projections = query.projections
    want = projected_rows(model, query.modules, projections, grads)
    assert (got.double() - want).norm() / want.norm() < 1e-5


def test_logprob_query_is_the_answer_loss_query_negated(tmp_path):
    """On the tiny LM: the answer-token loss query, its completion_loss twin and the
    completion_logprob query (backpropagated as is) give the same rows up to sign; the first two
    the same top-k, the third the reverse order (its scores are the negated scores)."""
    torch.manual_seed(0)
    c = C.generate(n_entities=6, seed=3)
    model = TinyDecoder(len(c.vocab), d_model=16, n_layers=1, n_heads=2, max_len=64)
    config = {
        "capture": {"types": ["Linear"], "attribution_only": True},
        "projection": {"kind": "random", "rank_in": 8, "rank_out": 8, "seed": 1},
    }
    log_documents(model, c, tmp_path / "r", config)
    qb = question_batch(c, c.test_questions[:4])
    rows = {}
    measures = {
        "answer loss": lambda: sequence_losses(model, qb),
        "completion_loss": lambda: M.completion_loss(model(qb.tokens, qb.pad_mask), qb.tokens, qb.loss_mask),
        "completion_logprob": lambda: M.completion_logprob(
            model(qb.tokens, qb.pad_mask), qb.tokens, qb.loss_mask
        ),
    }
    for name, measure in measures.items():
        query = logix.init(tmp_path / "r", mode="query")
        query.watch(model)
        with query(data_id=[0, 1, 2, 3], mask=qb.pad_mask):
            M.reduce(measure(), query).backward()
        rows[name] = query.gradients()
    a, b, lp = (rows[n].values for n in measures)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp, -a, rtol=1e-5, atol=1e-6)
    engine = logix.InfluenceEngine(tmp_path / "r", preconditioner="raw", damping=0.1)
    top = {n: engine.top_k(rows[n], k=5) for n in measures}
    assert torch.equal(top["answer loss"].indices, top["completion_loss"].indices)
    full = engine.scores(rows["answer loss"]).values
    bottom = torch.sort(full, dim=1, stable=True).indices[:, :5]  # lowest scores first
    assert torch.equal(top["completion_logprob"].indices, bottom)
    torch.testing.assert_close(
        top["completion_logprob"].values, -full.gather(1, bottom), rtol=1e-4, atol=1e-6
    )


def test_reduce_follows_the_store(tmp_path):
    """`reduce` takes the mean for a `mean` store: the rows are then the per-example gradients
    whatever the batch size (a plain .sum() would scale them by B)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    config = {"capture": {"loss_reduction": "mean"}, "projection": {"kind": "identity"}}
    rows, query = query_rows(tmp_path, model, x, lambda out: M.cross_entropy(out, y), config)
    with query(data_id=[10, 11, 12, 13]):
        M.cross_entropy(model(x), y).sum().backward()  # the wrong reduction for this store
    summed = query.gradients().values[4:]
    torch.testing.assert_close(summed, 4 * rows)
    model.zero_grad()
    F.cross_entropy(model(x[:1]), y[:1]).backward()
    w, b = model[0].weight.grad, model[0].bias.grad
    torch.testing.assert_close(rows[0], torch.cat([w, b[:, None]], 1).reshape(-1))
    assert math.isclose(float(M.reduce(torch.tensor([1.0, 3.0]), query)), 2.0)
