"""The digits unroll example's ground-truth measurement: test losses of confident predictions
must not round away (they are what single-model retraining compares)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def _example():
    sys.path.insert(0, str(DIGITS))
    spec = importlib.util.spec_from_file_location("digits_unroll_example", DIGITS / "unroll.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_test_losses_resolve_losses_below_float32_rounding():
    example = _example()
    torch.manual_seed(0)
    x = torch.rand(6, 64)
    y = torch.arange(6) % 10
    model = nn.Linear(64, 10)
    with torch.no_grad():  # a margin of 16-21 on the labelled class: losses 1e-9 … 1e-6
        model.weight.zero_()
        model.bias.zero_()
        model.weight[y, torch.arange(6)] = 16.0 + torch.arange(6, dtype=torch.float32)
        x[:, :6] = torch.eye(6)
    got = example.test_losses(model, SimpleNamespace(x_test=x, y_test=y), 6)

    logits = model(x).detach().double()  # reference: log(1 + Σ_{j≠y} exp(z_j − z_y)) by log1p
    gaps = logits - logits.gather(1, y[:, None])
    gaps[torch.arange(6), y] = -float("inf")
    expected = torch.log1p(gaps.exp().sum(1))
    assert float(expected.max()) < 1e-5 and float(expected.min()) < 1e-8
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0.0)
