"""Captured projected per-example gradients equal torch.func references (DESIGN §1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import per_example_grads, projected_rows
from torch import nn

import logix

torch.set_default_dtype(torch.float32)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class SeqMLP(nn.Module):
    """Linear layers applied to [B, T, d] (and a 4-D [B, 2, T, d] input for the first one)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))  # [B, 2, T, 5]
        return self.fc2(h.mean(1))  # [B, T, 4]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, 2, dilation=2, padding="same", padding_mode="reflect")
        self.c3 = nn.Conv2d(4, 2, (2, 3), stride=(1, 2), bias=False)
        self.head = nn.Linear(2 * 4 * 2, 4)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        h = self.c3(h)
        return self.head(h.flatten(1))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.out = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)))


class Conv1D(nn.Module):
    """transformers' GPT-2 layer, declared here so the test needs no transformers (logix knows it
    by class name): weight [d_in, d_out], y = x weight + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.4)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.reshape(x.shape[:-1] + (self.nf,))


class Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(5, 6)
        self.c_proj = Conv1D(4, 5)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


def _ce_per_example(out, y):
    """Cross-entropy summed over all positions of each example: [B, ..., C], [B, ...] -> [B]."""
    b, c = out.shape[0], out.shape[-1]
    return F.cross_entropy(out.reshape(-1, c), y.reshape(-1), reduction="none").reshape(b, -1).sum(1)


def make_case(kind: str, batch: int, gen: torch.Generator):
    if kind == "mlp":
        return MLP(), torch.randn(batch, 6, generator=gen), torch.randint(0, 4, (batch,), generator=gen)
    if kind == "seq":
        x = torch.randn(batch, 2, 5, 6, generator=gen)
        return SeqMLP(), x, torch.randint(0, 4, (batch, 5), generator=gen)
    if kind == "conv":
        x = torch.randn(batch, 2, 9, 9, generator=gen)
        return ConvNet(), x, torch.randint(0, 4, (batch,), generator=gen)
    if kind == "conv1d":
        x = torch.randn(batch, 5, 6, generator=gen)
        return Conv1DNet(), x, torch.randint(0, 4, (batch, 5), generator=gen)
    tokens = torch.randint(0, 11, (batch, 6), generator=gen)
    tokens[:, -1] = 0  # padding index: its row of the weight never gets a gradient
    return EmbedNet(), tokens, torch.randint(0, 3, (batch, 6), generator=gen)


def capture(tmp_path, model, x, y, config, reduction):
    """Log-mode set-up (creates the store and its projections), then a query-mode capture."""
    with logix.init(tmp_path / "run", config=config) as run:
        run.watch(model)
    query = logix.init(tmp_path / "run", mode="query")
    query.watch(model)
    with query(data_id=list(range(x.shape[0]))):
        per = _ce_per_example(model(x), y)
        loss = per.sum() if reduction == "sum" else per.mean()
        loss.backward()
    return query


@pytest.mark.parametrize("kind", ["mlp", "seq", "conv", "conv1d", "embed"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("projection", ["identity", "random"])
def test_matches_torch_func(tmp_path, kind, bias, reduction, batch, projection):
    gen = torch.Generator().manual_seed(hash((kind, batch)) % 1000)
    torch.manual_seed(0)
    model, x, y = make_case(kind, batch, gen)
    config = {
        "capture": {"bias": bias, "loss_reduction": reduction},
        "projection": {"kind": projection, "rank_in": 3, "rank_out": 2, "seed": 5},
    }
    query = capture(tmp_path, model, x, y, config, reduction)
    got = query.gradients()
    assert got.data_ids == list(range(batch))
    projections = query.projections
    grads = per_example_grads(model, lambda o, t: _ce_per_example(o, t).sum(), (x,), y)
    want = projected_rows(model, query.modules, projections, grads)
    assert got.values.shape == want.shape
    err = (got.values.double() - want).norm() / want.norm()
    assert err < 1e-5, f"relative error {err:.2e}"
    # every module contributes (none silently zero)
    for m in query.modules:
        assert want[:, m.columns].abs().sum() > 0


def test_identity_projection_is_exact_parameter_gradient(tmp_path):
    """With identity projection a row is the per-example gradient itself, bias last column."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    query = capture(
        tmp_path,
        model,
        x,
        y,
        {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "sum"}},
        "sum",
    )
    rows = query.gradients().values
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        w, b = model[0].weight.grad, model[0].bias.grad
        expect = torch.cat([w, b[:, None]], dim=1).reshape(-1)
        torch.testing.assert_close(rows[i], expect, rtol=1e-6, atol=1e-7)


def test_rank_clamped_to_dimension_is_noted(tmp_path):
    model = MLP()
    with logix.init(tmp_path / "r", config={"projection": {"rank_in": 64, "rank_out": 2}}) as run:
        run.watch(model)
    table = {m.name: m for m in run.modules}
    assert (table["fc1"].r_in, table["fc1"].r_out) == (7, 2)  # 6 inputs + bias, kept whole
    assert (table["fc2"].r_in, table["fc2"].r_out) == (5, 2)
    notes = logix.open_store(tmp_path / "r").manifest["projection"]["notes"]
    assert any("fc1" in n and "kept whole" in n for n in notes)


def test_random_projection_is_seeded_and_saved(tmp_path):
    cfg = {"projection": {"rank_in": 3, "rank_out": 2, "seed": 11}}
    runs = []
    for name in ("a", "b"):
        run = logix.init(tmp_path / name, config=cfg)
        run.watch(MLP())
        run.finalize()
        runs.append(run.projections)
    for name in runs[0]:
        assert torch.equal(runs[0][name].p_in.matrix, runs[1][name].p_in.matrix)
    reopened = logix.init(tmp_path / "a", mode="query")
    reopened.watch(MLP())
    for name, projection in reopened.projections.items():
        assert torch.equal(projection.p_in.matrix, runs[0][name].p_in.matrix)
    other = logix.init(tmp_path / "c", config={"projection": {"rank_in": 3, "rank_out": 2, "seed": 12}})
    other.watch(MLP())
    assert not torch.equal(next(iter(other.projections.values())).p_in.matrix, runs[0]["fc1"].p_in.matrix)
    other.finalize()


def test_padding_mask_removes_padded_positions(tmp_path):
    """A [B, T] mask zeroes the padded positions' contribution, as if they were not there."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with logix.init(tmp_path / "r", config={"projection": {"kind": "identity"}}) as run:
        run.watch(model)
    q = logix.init(tmp_path / "r", mode="query")
    q.watch(model)
    with q(data_id=[0, 1], mask=mask):
        model(x).pow(2).sum().mul(0.5).backward()  # mean reduction: /B undone
    rows = q.gradients().values
    # reference: example 0 without its padded positions, example 1 whole (loss is per position)
    for i, t in ((0, 3), (1, 5)):
        model.zero_grad()
        model(x[i : i + 1, :t]).pow(2).sum().backward()
        w, b = model[0].weight.grad, model[0].bias.grad
        torch.testing.assert_close(rows[i], torch.cat([w, b[:, None]], 1).reshape(-1))


def test_conv1d_recognised_by_class_name_only(tmp_path):
    """transformers' Conv1D is captured as type 'Conv1D' (weight [d_in, d_out]); torch's
    nn.Conv1d is a different layer, captured as 'Conv1d' (weight [C_out, C_in, k])."""
    model = nn.Sequential(Conv1DNet(), nn.Conv1d(5, 3, 1))
    with logix.init(tmp_path / "r", config={"projection": {"kind": "identity"}}) as run:
        run.watch(model)
    assert [(m.name, m.type, m.d_in, m.d_out) for m in run.modules] == [
        ("0.c_fc", "Conv1D", 7, 5),
        ("0.c_proj", "Conv1D", 6, 4),
        ("1", "Conv1d", 6, 3),
    ]
