"""Coverage said out loud: the table at `run.watch`, `run.coverage()` as data, the
`capture.uncovered` error mode, and the first block's unfired-module check."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.errors import CaptureError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


class RecurrentNet(nn.Module):
    """The model of issue #18: Embedding → LSTM → LayerNorm → Linear, plus a bare parameter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.ones(4, 8))

    def forward(self, tokens):
        h, _ = self.rnn(self.emb(tokens) * self.scale[: tokens.shape[1]])
        return self.head(self.norm(h)).mean(1)


def numel(*params) -> int:
    return sum(p.numel() for p in params)


def test_coverage_data_and_table(tmp_path, capsys):
    model = RecurrentNet()
    with logix.init(tmp_path / "r", config={"capture": {"types": ["Linear"]}}) as run:
        run.watch(model)
        cov = run.coverage()
    total = numel(*model.parameters())
    matrices = numel(*(p for p in model.parameters() if p.ndim >= 2))
    assert cov.captured == {"Linear": 1} and cov.captured_modules == ("head",)
    assert cov.captured_parameters == numel(model.head.weight, model.head.bias)
    assert cov.total_parameters == total and cov.matrix_parameters == matrices
    assert cov.captured_matrix_parameters == model.head.weight.numel()
    assert cov.matrix_share == pytest.approx(model.head.weight.numel() / matrices)
    groups = {g.type: g for g in cov.uncovered}
    assert set(groups) == {"LSTM", "LayerNorm", "Embedding", "RecurrentNet"}
    lstm = groups["LSTM"]
    assert lstm.modules == ("rnn",) and lstm.parameters == numel(*model.rnn.parameters())
    assert lstm.matrix_parameters == numel(*(p for p in model.rnn.parameters() if p.ndim == 2))
    assert lstm.share == pytest.approx(lstm.parameters / total)
    assert groups["LayerNorm"].matrix_parameters == 0
    assert groups["Embedding"].reason == "type not in capture.types"
    assert "add 'Embedding' to capture.types" in groups["Embedding"].fix()
    assert groups["RecurrentNet"].modules == ("scale",)
    # every parameter is accounted for exactly once
    assert cov.captured_parameters + sum(g.parameters for g in cov.uncovered) == total
    err = capsys.readouterr().err
    assert "logix watches 1 module:" in err
    for word in ("LSTM", "rnn", f"{lstm.share:.1%}", "LayerNorm", "add 'Embedding' to capture.types"):
        assert word in err, word


def test_uncovered_error_names_the_fix_and_writes_nothing(tmp_path):
    config = {"capture": {"types": ["Linear", "Embedding"], "uncovered": "error"}}
    with pytest.raises(CaptureError, match=r"LSTM \['rnn'\].*capture.exclude") as info:
        logix.init(tmp_path / "r", config=config).watch(RecurrentNet())
    assert "'scale'" in str(info.value) and "LayerNorm" not in str(info.value)  # vectors never error
    assert not (tmp_path / "r" / "manifest.json").exists()
    # an explicit exclude (a module's name, or a bare parameter's) is on purpose: no error
    config["capture"]["exclude"] = ["rnn", "scale"]
    with logix.init(tmp_path / "r2", config=config) as run:
        run.watch(RecurrentNet())
    reasons = {g.type: g.reason for g in run.coverage().uncovered}
    assert reasons["LSTM"] == reasons["RecurrentNet"] == "capture.exclude"
    assert run.coverage().uncovered_matrices() == []


def test_uncovered_key_is_validated():
    with pytest.raises(ConfigError, match="capture.uncovered must be one of.*did you mean 'error'"):
        logix.LogixConfig.from_dict({"capture": {"uncovered": "errors"}})


def test_cnn_under_linear_only_config_is_said(tmp_path, capsys):
    """configs/retrieval.yaml once watched only Linear: a CNN's convolutions were dropped silently."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    with logix.init(tmp_path / "r", config={"capture": {"types": ["Linear"]}}) as run:
        run.watch(model)
    assert "add 'Conv2d' to capture.types" in capsys.readouterr().err
    assert run.coverage().uncovered_matrices()[0].modules == ("0",)
    cfg = logix.LogixConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "retrieval.yaml")
    assert {"Conv1d", "Conv2d", "Conv1D", "Linear"} <= set(cfg.capture.types)


def test_did_you_mean_tells_conv1d_from_conv1D():
    with pytest.raises(ConfigError, match=r"'Conv1D' or 'Conv1d'.*torch.nn.Conv1d.*GPT-2"):
        logix.LogixConfig.from_dict({"capture": {"types": ["conv1d"]}})
    assert logix.LogixConfig.from_dict({"capture": {"types": ["Conv1d"]}}).capture.types == ["Conv1d"]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, functional=False):
        h = torch.tanh(self.a(x))
        if functional:  # the weight used outside its module's forward
            h = h + F.linear(h, self.unused.weight)
        return self.head(h)


def _log_block(run, model, first_id=0, **kwargs):
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    with run(data_id=list(range(first_id, first_id + 3))):
        F.cross_entropy(model(x, **kwargs), y).backward()


def test_unfired_module_is_an_error_at_the_first_block(tmp_path):
    model = Branchy()
    run = logix.init(tmp_path / "r")
    run.watch(model)
    with pytest.raises(CaptureError, match=r"\['unused'\] took no part.*capture.exclude.*unfired: notice"):
        _log_block(run, model)
    run.finalize()
    assert logix.open_store(tmp_path / "r").data_ids == []  # the failed block stored nothing
    # used outside its forward through F.linear: captured there (exact, tests/test_tied_weights.py),
    # so it fired; an op logix cannot capture is an error (tests/test_tied_weights.py too)
    with logix.init(tmp_path / "r2", config={"capture": {"unfired": "notice"}}) as run:
        run.watch(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _log_block(run, model, functional=True)


def test_unfired_notice_and_exclude(tmp_path):
    model = Branchy()
    with logix.init(tmp_path / "r", config={"capture": {"unfired": "notice"}}) as run:
        run.watch(model)
        with pytest.warns(UserWarning, match=r"\['unused'\] took no part.*exact"):
            _log_block(run, model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the check runs on the first block only
            _log_block(run, model, first_id=3)
    with logix.init(tmp_path / "r2", config={"capture": {"exclude": ["unused"]}}) as run:
        run.watch(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _log_block(run, model)
    assert [m.name for m in run.modules] == ["a", "head"]


def test_fired_by_another_capture_path_counts(tmp_path):
    """The hook for functional interception: names in CaptureBlock.fired count as fired."""
    model = Branchy()
    with logix.init(tmp_path / "r") as run:
        run.watch(model)
        x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
        with run(data_id=[0, 1, 2]) as block:
            block.capture.fired.add("unused")
            F.cross_entropy(model(x), y).backward()
    assert len(logix.open_store(tmp_path / "r").data_ids) == 3
