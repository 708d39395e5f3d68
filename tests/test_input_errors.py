"""Small input mistakes (#10 point 10): each gets a clear error naming the fix, before anything
is stored; the legitimate neighbours of each mistake keep working, with exact rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import logix
from logix.config import LogixConfig
from logix.errors import CaptureError, ConfigError

SUM = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "sum"}}


# ----------------------------------------------------------------------------- config files
def test_binary_config_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256)))
    with pytest.raises(ConfigError, match=r"model.bin is not a text file \(byte \d+ is not UTF-8\)"):
        LogixConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="not a text file"):
        logix.init(tmp_path / "r", config=path)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN"])
def test_non_finite_float_in_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"query:\n  damping: {text}\n")
    with pytest.raises(ConfigError, match="query.damping must be a finite number"):
        LogixConfig.from_yaml(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_float_in_dict(value):
    with pytest.raises(ConfigError, match="query.damping must be a finite number"):
        LogixConfig.load({"query": {"damping": value}})
    assert LogixConfig.load({"query": {"damping": 1e30}}).query.damping == 1e30


# ----------------------------------------------------------------------------- masks
def _query_run(tmp_path, model):
    with logix.init(tmp_path / "r", config=SUM) as run:
        run.watch(model)
    q = logix.init(tmp_path / "r", mode="query")
    q.watch(model)
    return q


def _row(layer: nn.Linear) -> torch.Tensor:
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).reshape(-1)


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1, 2, 1], [1, 1, 0]]),
        torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 0.0]]),
        torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]]),
        torch.tensor([[1, -1, 1], [1, 1, 1]]),
    ],
)
def test_mask_values_other_than_0_and_1_are_refused(tmp_path, mask):
    model = nn.Sequential(nn.Linear(4, 3))
    q = _query_run(tmp_path, model)
    with pytest.raises(CaptureError, match="padding mask marks real .1. and padded .0. positions"):
        q(data_id=[0, 1], mask=mask)
    with pytest.raises(CaptureError, match=r"mask must be a tensor \[batch=2, seq\]"):
        q(data_id=[0, 1], mask=torch.ones(3, 3))


@pytest.mark.parametrize("kind", [torch.bool, torch.long, torch.float32])
def test_0_1_masks_of_every_dtype_work(tmp_path, kind):
    """bool, integer and float masks of 0/1 give each example's gradient without its padding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 5, 4)
    q = _query_run(tmp_path, model)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).to(kind)
    with q(data_id=[0, 1], mask=mask):
        model(x).pow(2).sum().backward()
    rows = q.gradients().values
    for i, t in ((0, 2), (1, 5)):
        model.zero_grad()
        model(x[i : i + 1, :t]).pow(2).sum().backward()
        torch.testing.assert_close(rows[i], _row(model[0]))


def test_sequence_mask_on_a_model_without_sequence_axis(tmp_path):
    """An MLP sees one position per example: a [B, T] mask cannot apply to any layer."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    q = _query_run(tmp_path, model)
    with pytest.raises(
        CaptureError,
        match=r"no watched module has a sequence axis.*'0' \(input "
        r"\[2, 4\]\), '2' \(input \[2, 3\]\).*drop mask=",
    ):
        with q(data_id=[0, 1], mask=torch.ones(2, 6)):
            model(torch.randn(2, 4)).sum().backward()
    assert q.gradients().data_ids == []  # nothing of the failed block was kept


def test_sequence_mask_on_a_conv_net(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 1))
    q = _query_run(tmp_path, model)
    with pytest.raises(CaptureError, match=r"'0' \(input \[2, 1, 6, 6\]\), '2' \(input \[2, 32\]\)"):
        with q(data_id=[0, 1], mask=torch.ones(2, 36)):
            model(torch.randn(2, 1, 6, 6)).sum().backward()


class PooledClassifier(nn.Module):
    """A per-position layer, a masked mean over positions, a head on the pooled features."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x, mask):
        h = torch.tanh(self.body(x)) * mask[..., None]
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


def test_sequence_mask_with_a_pooled_head(tmp_path):
    """The mask applies to the sequence layer; the head, which has no sequence axis, is
    captured whole: both rows equal each example's gradient computed without its padding."""
    torch.manual_seed(1)
    model = PooledClassifier()
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    q = _query_run(tmp_path, model)
    with q(data_id=[0, 1], mask=mask):
        model(x, mask).pow(2).sum().backward()
    rows = q.gradients().values
    for i, t in ((0, 3), (1, 5)):
        model.zero_grad()
        model(x[i : i + 1, :t], mask[i : i + 1, :t]).pow(2).sum().backward()
        torch.testing.assert_close(rows[i], torch.cat([_row(model.body), _row(model.head)]))


def test_one_position_mask_on_a_model_without_sequence_axis(tmp_path):
    """A [B, 1] mask marks each example's only position: 0 leaves the example out (row 0)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    q = _query_run(tmp_path, model)
    with q(data_id=[0, 1], mask=torch.tensor([[0], [1]])):
        model(x).pow(2).sum().backward()
    rows = q.gradients().values
    model.zero_grad()
    model(x[1:]).pow(2).sum().backward()
    assert torch.count_nonzero(rows[0]) == 0
    torch.testing.assert_close(rows[1], _row(model[0]))


# ----------------------------------------------------------------------------- selection
def test_watching_a_bare_layer(tmp_path):
    layer = nn.Linear(3, 2)
    run = logix.init(tmp_path / "r")
    with pytest.raises(
        CaptureError,
        match=r"the model is itself a Linear layer.*nn.Sequential\(layer\)"
        r".*watched as '0'",
    ):
        run.watch(layer)
    assert not (tmp_path / "r").exists()
    with logix.init(tmp_path / "r") as run:
        run.watch(nn.Sequential(layer))
        assert [m.name for m in run.modules] == ["0"]
