"""Language-model helpers: the per-example next-token loss against a token-by-token loop, rows of
padded batches against torch.func gradients of each unpadded sequence, the reduction check, and
position embeddings called without a batch axis skipped with a notice."""

from __future__ import annotations

import pytest
import torch
from reference import module_gradient
from torch import nn
from torch.func import functional_call, grad

import logix
from logix import losses


class BigramLM(nn.Module):
    """Token and position embeddings, one hidden layer, a head: logits [B, T, V]."""

    def __init__(self, vocab: int = 7, d: int = 4, max_len: int = 8):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))  # pos: no batch axis
        return self.head(torch.tanh(self.fc(h)))


def batch(gen):
    ids = torch.randint(1, 7, (3, 6), generator=gen)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    return ids * mask, mask


@pytest.mark.parametrize("per_example", ["sum", "mean"])
def test_next_token_loss_matches_a_token_loop(per_example):
    gen = torch.Generator().manual_seed(0)
    ids, mask = batch(gen)
    logits = torch.randn(3, 6, 7, generator=gen)
    got = losses.next_token_loss(logits, ids, mask, per_example=per_example)
    for b in range(3):
        terms = [-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for t in range(5) if mask[b, t + 1] == 1]
        want = sum(terms) / (len(terms) if per_example == "mean" else 1)
        assert abs(float(got[b]) - float(want)) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_padded_rows_are_each_sequences_gradient_and_pos_is_skipped(tmp_path, reduction):
    torch.manual_seed(0)
    model = BigramLM()
    ids, mask = batch(torch.Generator().manual_seed(1))
    cfg = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": reduction}}
    with logix.init(tmp_path / "s", config=cfg) as run:
        run.watch(model)
        with pytest.warns(UserWarning, match="'pos' is an Embedding called without a batch axis"):
            with run(data_id=[0, 1, 2], mask=mask):
                per = losses.next_token_loss(model(ids), ids, mask, per_example="mean")
                losses.batch_loss(per, run).backward()
    store = logix.open_store(tmp_path / "s")
    rows = store.load().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    named = dict(model.named_modules())
    for b in range(3):
        n = int(mask[b].sum())
        one = ids[b : b + 1, :n]

        def loss(p, one=one):
            return losses.next_token_loss(functional_call(model, p, (one,)), one, per_example="mean")[0]

        g = {k: v[None] for k, v in grad(loss)(params).items()}
        for m in store.modules:
            block = rows[b, m.columns]
            if m.name == "pos":
                assert torch.count_nonzero(block) == 0
                continue
            want = module_gradient(named[m.name], m.name, g, m.bias).double().reshape(-1)
            assert torch.allclose(block, want, atol=1e-5), (b, m.name)


def test_check_batch_reduction_names_the_fix(tmp_path):
    run = logix.init(tmp_path / "r", config={"capture": {"loss_reduction": "mean"}})
    per = torch.tensor([1.0, 2.0, 6.0])
    losses.check_batch_reduction(per.mean(), per, run)  # as configured: no error
    with pytest.raises(logix.ConfigError, match="set it to 'sum'"):
        losses.check_batch_reduction(per.sum(), per, run)
    with pytest.raises(logix.ConfigError, match="mean over tokens"):
        losses.check_batch_reduction(torch.tensor(2.5), per, run)
    with pytest.raises(logix.ChoiceError):
        losses.next_token_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), per_example="token")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_check_loop_loss_detects_each_reduction_and_the_token_mean(tmp_path, reduction):
    run = logix.init(tmp_path / "r", config={"capture": {"loss_reduction": reduction}})
    gen = torch.Generator().manual_seed(3)
    ids, mask = batch(gen)  # three sequences of 6, 4 and 2 tokens
    logits = torch.randn(3, 6, 7, generator=gen)
    other = "sum" if reduction == "mean" else "mean"
    for per in ("sum", "mean"):
        per_example = losses.next_token_loss(logits, ids, mask, per_example=per)
        own = per_example.mean() if reduction == "mean" else per_example.sum()
        assert losses.check_loop_loss(own, logits, ids, mask, run) == per
        wrong = per_example.sum() if reduction == "mean" else per_example.mean()
        with pytest.raises(logix.ConfigError, match=f"set it to '{other}'"):
            losses.check_loop_loss(wrong, logits, ids, mask, run)
    # The usual LM loop: cross-entropy over every real target token of the batch at once.
    targets = torch.where(mask[:, 1:] == 1, ids[:, 1:], -100)
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
    with pytest.raises(logix.ConfigError, match="mean over every target token of the batch"):
        losses.check_loop_loss(token_mean, logits, ids, mask, run)
    with pytest.raises(logix.ConfigError, match="no mean or sum over the batch"):
        losses.check_loop_loss(token_mean * 1.5, logits, ids, mask, run)
    run.finalize()


def test_token_mean_rows_are_not_per_sequence_gradients(tmp_path):
    """Why the check exists: with a token-mean loop loss, each logged row is its sequence's
    gradient scaled by B·n_b/N (n_b its targets, N the batch's), not the sequence's own."""
    torch.manual_seed(0)
    model = BigramLM()
    ids, mask = batch(torch.Generator().manual_seed(1))
    cfg = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "mean", "exclude": ["pos"]}}
    targets = torch.where(mask[:, 1:] == 1, ids[:, 1:], -100)
    with logix.init(tmp_path / "s", config=cfg) as run:
        run.watch(model)
        with pytest.warns(logix.LossReductionWarning, match="mean over every target token"):
            with run(data_id=[0, 1, 2], mask=mask):  # the first block checks it by itself
                logits = model(ids)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
                loss.backward()
        with pytest.raises(logix.ConfigError, match="mean over every target token"):
            losses.check_loop_loss(loss, logits, ids, mask, run)
    rows = logix.open_store(tmp_path / "s").load().double()
    n = mask[:, 1:].sum(1).double()
    own = []
    for b in range(3):  # each sequence's own per-example mean loss, alone
        model.zero_grad()
        losses.next_token_loss(
            model(ids[b : b + 1]), ids[b : b + 1], mask[b : b + 1], "mean"
        ).sum().backward()
        logged = [p for name, p in model.named_parameters() if not name.startswith("pos.")]
        own.append(torch.cat([p.grad.flatten() for p in logged]))
    for b in range(3):
        ratio = rows[b].norm() / own[b].double().norm()
        assert abs(float(ratio) - float(3 * n[b] / n.sum())) < 1e-4
        if n[b] != n.mean():  # a sequence of other than the mean length: not its own gradient
            assert abs(float(ratio) - 1.0) > 0.05
