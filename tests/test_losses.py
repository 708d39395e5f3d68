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
