"""Parameters used more than once or outside their module: one column block per parameter,
holding the per-example gradient of all its uses summed (exact against torch.func), and a clear
error for a use logix cannot capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_helpers import assert_rows_match, captured_and_reference
from reference import per_example_grads, projected_rows
from torch import nn

import logix
from logix.errors import CaptureError

V, D, T, B = 11, 6, 5, 3


def _lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-100, reduction="sum")


class TiedLM(nn.Module):
    """Embedding, a hidden layer, and an output head tied to the embedding: as a module sharing
    the Parameter (`head="module"`, Hugging Face's tied lm_head), through F.linear in the
    model's code (`head="functional"`), or by an op logix cannot capture (`head="matmul"`,
    `"einsum"`)."""

    def __init__(self, head="module", padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.hidden = nn.Linear(D, D)
        self.how = head
        if head == "module":
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = torch.tanh(self.hidden(self.emb(tokens)))
        if self.how == "module":
            return self.head(h)
        if self.how == "functional":
            return F.linear(h, self.emb.weight)
        if self.how == "matmul":
            return h @ self.emb.weight.T
        return torch.einsum("btd,vd->btv", h, self.emb.weight)


def _tokens(gen):
    tokens = torch.randint(1, V, (B, T), generator=gen)
    tokens[0, -2:] = 0
    y = tokens.roll(-1, 1)
    y[0, -3:] = -100
    return tokens, y


@pytest.mark.parametrize("head", ["module", "functional"])
@pytest.mark.parametrize("projection", ["identity", "random"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_tied_head_rows_are_the_gradient_of_all_uses(tmp_path, head, projection, reduction):
    torch.manual_seed(0)
    model = TiedLM(head, padding_idx=0)
    tokens, y = _tokens(torch.Generator().manual_seed(1))
    config = {"capture": {"loss_reduction": reduction}}
    if projection == "random":
        config["projection"] = {"kind": "random", "rank_in": 4, "rank_out": 3}

    def loss_fn(logits, y):  # the reference's batches are single examples: the same per-example loss
        return _lm_loss(logits, y) / (y.shape[0] if reduction == "mean" else 1)

    got, want, modules = captured_and_reference(tmp_path, model, (tokens,), y, loss_fn, config=config)
    assert [m.name for m in modules] == ["emb", "hidden"]  # one block for the shared weight
    assert_rows_match(got, want, modules)


def test_embeddings_sharing_a_table(tmp_path):
    """Two Embedding modules on one Parameter (encoder and decoder embeddings of a seq2seq)."""

    class TwoTables(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Embedding(V, D)
            self.dec = nn.Embedding(V, D)
            self.dec.weight = self.enc.weight
            self.head = nn.Linear(D, V)

        def forward(self, tokens):
            return self.head(torch.tanh(self.enc(tokens) * self.dec(tokens.flip(1))))

    torch.manual_seed(0)
    tokens, y = _tokens(torch.Generator().manual_seed(1))
    got, want, modules = captured_and_reference(tmp_path, TwoTables(), (tokens,), y, _lm_loss)
    assert [m.name for m in modules] == ["enc", "head"]
    assert_rows_match(got, want, modules)


@pytest.mark.parametrize("head, op", [("matmul", "matmul"), ("einsum", "einsum")])
def test_uncapturable_use_is_an_error_naming_module_and_op(tmp_path, head, op):
    torch.manual_seed(0)
    model = TiedLM(head)
    tokens, y = _tokens(torch.Generator().manual_seed(1))
    with logix.init(tmp_path / "run", config={"capture": {"loss_reduction": "sum"}}) as run:
        run.watch(model)
        with pytest.raises(CaptureError, match=rf"'emb'.*{op}"):
            with run(data_id=list(range(B))):
                _lm_loss(model(tokens), y).backward()


def test_reading_a_weight_without_gradient_is_not_a_use(tmp_path):
    """A weight read for logging (its result never reached by backward) is no error."""
    torch.manual_seed(0)
    model = TiedLM("module")
    tokens, y = _tokens(torch.Generator().manual_seed(1))
    with logix.init(tmp_path / "run", config={"capture": {"loss_reduction": "sum"}}) as run:
        run.watch(model)
        with run(data_id=list(range(B))):
            _lm_loss(model(tokens), y).backward()
            norm = model.emb.weight.norm()  # after backward, never differentiated
            with torch.no_grad():
                model.hidden.weight.sum()
        assert norm > 0


@pytest.mark.parametrize("projection", ["identity", "random"])
def test_embedding_reading_a_watched_head(tmp_path, projection):
    """capture.types [Linear]: the head owns the tied weight and the (unwatched) Embedding's
    lookups add their gradient to the head's block."""
    torch.manual_seed(0)
    model = TiedLM("module", padding_idx=0)
    tokens, y = _tokens(torch.Generator().manual_seed(1))
    config = {"capture": {"types": ["Linear"], "loss_reduction": "sum"}}
    if projection == "random":
        config["projection"] = {"kind": "random", "rank_in": 4, "rank_out": 3}
    with logix.init(tmp_path / "run", config=config) as run:
        run.watch(model)
    query = logix.init(tmp_path / "run", mode="query")
    query.watch(model)
    with query(data_id=list(range(B))):
        _lm_loss(model(tokens), y).backward()
    got = query.gradients().values.double()
    assert [m.name for m in query.modules] == ["hidden", "head"]
    grads = per_example_grads(model, _lm_loss, (tokens,), y)
    grads["head.weight"] = grads["emb.weight"]  # one Parameter: the gradient of all its uses
    want = projected_rows(model, query.modules, query.projections, grads)
    query.finalize()
    assert_rows_match(got, want, query.modules)


class TwoUses(nn.Module):
    """A Linear applied by its module and again by F.linear in the model's code, and a second
    Linear used only through F.linear (its module's forward never runs)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(F.linear(h, self.a.weight, self.a.bias)) + F.linear(h, self.b.weight)
        return self.head(h)


def test_linear_weights_used_through_f_linear(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    got, want, modules = captured_and_reference(tmp_path, TwoUses(), (x,), y, _lm_loss)
    assert [m.name for m in modules] == ["a", "b", "head"]
    assert_rows_match(got, want, modules)  # b's bias column: zero in both (F.linear without it)


@pytest.mark.parametrize("head", ["module", "functional"])
def test_per_token_factors_of_a_tied_table_sum_to_its_rows(tmp_path, head):
    """Token-level capture of a tied table mixes one-hot lookups and the head's dense uses: their
    per-position factors still sum to the exact rows."""
    torch.manual_seed(0)
    model = TiedLM(head, padding_idx=0)
    tokens, y = _tokens(torch.Generator().manual_seed(1))
    cfg = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "sum"}}
    got, want, modules = captured_and_reference(tmp_path / "rows", model, (tokens,), y, _lm_loss)
    with logix.init(tmp_path / "run", config=cfg) as run:
        run.watch(model)
    query = logix.init(tmp_path / "run", mode="query")
    query.watch(model)
    with query(data_id=list(range(B)), per_token=True, token_ids=tokens):
        _lm_loss(model(tokens), y).backward()
    per_token = query.token_gradients().gradients().values.double()
    query.finalize()
    torch.testing.assert_close(per_token, want, rtol=1e-4, atol=1e-6)
