"""torch's nn.Conv1d and grouped / depthwise nn.Conv2d captured exactly: rows equal to torch.func
per-example gradients (projected the same way), over stride, padding, dilation and padding modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import per_example_grads, projected_rows
from torch import nn

import logix

pytestmark = pytest.mark.usefixtures("one_thread")

CONV1D = {  # name -> (layer kwargs); input [B, 4, 11]
    "plain": dict(kernel_size=3),
    "stride-pad": dict(kernel_size=3, stride=2, padding=2),
    "dilation-same": dict(kernel_size=3, dilation=2, padding="same"),
    "reflect": dict(kernel_size=4, padding=1, padding_mode="reflect"),
    "circular-valid": dict(kernel_size=2, padding="valid", stride=3),
    "grouped": dict(kernel_size=3, groups=2, padding=1, padding_mode="circular"),
    "depthwise": dict(kernel_size=3, groups=4, dilation=2, bias=False),
}
CONV2D = {  # input [B, 4, 7, 7]
    "grouped": dict(kernel_size=3, groups=2, padding=1),
    "grouped-stride-dilation": dict(kernel_size=(2, 3), groups=2, stride=(2, 1), dilation=(1, 2)),
    "depthwise": dict(kernel_size=3, groups=4, padding="same", padding_mode="reflect"),
    "depthwise-multiplier": dict(kernel_size=3, groups=4, stride=2, bias=False),
}


class ConvHead(nn.Module):
    """conv → tanh → global mean → linear head, so every conv position gets a gradient."""

    def __init__(self, conv: nn.Module, channels: int):
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(channels, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head(h.flatten(2).mean(2))


def build(dim: int, name: str) -> tuple[nn.Module, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(name) * 7 + dim)
    if dim == 1:
        kwargs, out = dict(CONV1D[name]), 4 if name == "depthwise" else 6
        conv, x = nn.Conv1d(4, out, **kwargs), torch.randn(5, 4, 11, generator=gen)
    else:
        kwargs, out = dict(CONV2D[name]), 8 if name == "depthwise-multiplier" else 4
        conv, x = nn.Conv2d(4, out, **kwargs), torch.randn(5, 4, 7, 7, generator=gen)
    return ConvHead(conv, out), x


def rows_and_reference(tmp_path, model, x, projection, reduction, bias=True):
    y = torch.arange(x.shape[0]) % 3
    config = {
        "capture": {"loss_reduction": reduction, "bias": bias},
        "projection": {"kind": projection, "rank_in": 5, "rank_out": 3, "seed": 1},
    }
    with logix.init(tmp_path / "r", config=config) as run:
        run.watch(model)
    query = logix.init(tmp_path / "r", mode="query")
    query.watch(model)
    with query(data_id=list(range(x.shape[0]))):
        per = F.cross_entropy(model(x), y, reduction="none")
        (per.sum() if reduction == "sum" else per.mean()).backward()
    got = query.gradients().values.double()
    grads = per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), (x,), y)
    want = projected_rows(model, query.modules, query.projections, grads)
    return query, got, want


@pytest.mark.parametrize(
    "dim,name", [(1, n) for n in CONV1D] + [(2, n) for n in CONV2D], ids=lambda v: str(v)
)
@pytest.mark.parametrize("projection,reduction", [("identity", "sum"), ("random", "mean")])
def test_conv_rows_match_torch_func(tmp_path, dim, name, projection, reduction):
    model, x = build(dim, name)
    query, got, want = rows_and_reference(tmp_path, model, x, projection, reduction)
    conv = query.modules[0]
    assert conv.type == f"Conv{dim}d"
    assert conv.d_in == model.conv.weight[0].numel() + int(model.conv.bias is not None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want[:, conv.columns].abs().sum() > 0  # the conv's block is not trivially zero


def test_grouped_conv_without_bias_capture(tmp_path):
    """capture.bias: false on a grouped conv with a bias: the weight alone, still exact."""
    model, x = build(2, "grouped")
    _, got, want = rows_and_reference(tmp_path, model, x, "random", "sum", bias=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
