"""The logging hot path normalises a batch's ids once and checks its rows' finiteness once,
without dropping a check: bad ids, repeated ids and non-finite rows are still refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
import logix.run.log_pass as log_pass
import logix.store.ids as ids_module
import logix.store.writer as writer_module
from logix.errors import StoreError


@pytest.fixture
def counted(monkeypatch):
    """Counts of the id normalisations and row finiteness checks made while logging."""
    counts = {"normalise": 0, "nonfinite": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    normalise = counting("normalise", ids_module.normalise_ids)
    nonfinite = counting("nonfinite", writer_module.nonfinite_rows)
    monkeypatch.setattr(ids_module, "normalise_ids", normalise)
    monkeypatch.setattr(writer_module, "normalise_ids", normalise)
    monkeypatch.setattr(writer_module, "nonfinite_rows", nonfinite)
    monkeypatch.setattr(log_pass, "nonfinite_rows", nonfinite)
    return counts


def _logging_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    run = logix.init(tmp_path / "r", config={"projection": {"rank_in": 2, "rank_out": 2}})
    run.watch(model)
    return run, model


def _step(run, model, ids, scale=1.0):
    with run(data_id=ids):
        (
            F.cross_entropy(model(torch.randn(len(ids), 4)), torch.zeros(len(ids), dtype=torch.long)) * scale
        ).backward()


def test_each_check_runs_once_per_step(tmp_path, counted):
    run, model = _logging_run(tmp_path)
    for step in range(3):
        before = dict(counted)
        _step(run, model, list(range(step * 4, step * 4 + 4)))
        assert counted["normalise"] - before["normalise"] == 1
        assert counted["nonfinite"] - before["nonfinite"] == 1
    run.finalize()
    assert logix.open_store(tmp_path / "r").data_ids == list(range(12))


def test_the_checks_still_refuse_bad_batches(tmp_path, counted):
    run, model = _logging_run(tmp_path)
    _step(run, model, [0, 1])
    with pytest.raises(StoreError, match="duplicate data id"):
        _step(run, model, [1, 2])
    with pytest.raises(StoreError, match="duplicate data id"):
        _step(run, model, [5, 5])
    with pytest.raises(StoreError, match="non-finite gradient rows"):
        _step(run, model, [3, 4], scale=math.nan)
    with pytest.raises(StoreError, match="duplicate data id"):  # duplicates are named first
        _step(run, model, [0, 9], scale=math.nan)
    with pytest.raises(StoreError, match="not valid: use ints or strings"):
        _step(run, model, [1.5, 2.5])
    run.finalize()
    assert logix.open_store(tmp_path / "r").data_ids == [0, 1]


def test_skipping_non_finite_batches(tmp_path, counted):
    run, model = _logging_run(tmp_path)
    with pytest.warns(UserWarning, match="skipped a batch of 2 examples"):
        with run(data_id=[7, 8]) as block:
            block.skip_if_nonfinite()
            (
                F.cross_entropy(model(torch.randn(2, 4)), torch.zeros(2, dtype=torch.long)) * math.nan
            ).backward()
    _step(run, model, [7, 8])  # nothing was stored: the same ids log fine
    run.finalize()
    assert logix.open_store(tmp_path / "r").data_ids == [7, 8]


def test_writer_add_called_directly_still_checks_everything(tmp_path):
    run, _ = _logging_run(tmp_path)
    writer = run.writer
    with pytest.raises(StoreError, match="rows must be a tensor"):
        writer.add([0], torch.zeros(1, writer.width + 1))
    with pytest.raises(StoreError, match="2 data ids for 1 rows"):
        writer.add([0, 1], torch.zeros(1, writer.width))
    with pytest.raises(StoreError, match="non-finite"):
        writer.add([0], torch.full((1, writer.width), math.inf))
    with pytest.raises(StoreError, match="not valid"):
        writer.add([None], torch.zeros(1, writer.width))
    writer.add([0], torch.zeros(1, writer.width))
    run.finalize()
    assert logix.open_store(tmp_path / "r").data_ids == [0]
