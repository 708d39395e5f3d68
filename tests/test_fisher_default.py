"""The engine's fisher follows the store: true-Fisher statistics present and no fisher asked ->
used, with a notice; otherwise the stored rows' empirical Fisher."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix


def store_with(path, true_pass: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    cfg = {"projection": {"kind": "random", "rank_in": 3, "rank_out": 2}}
    with logix.init(path, config=cfg) as run:
        run.watch(model)
        with run(data_id=list(range(12))):
            F.cross_entropy(model(x), y).backward()
    if true_pass:
        with logix.init(path, resume=True) as run:
            run.watch(model)
            with run.fit_curvature(fisher="true") as fit:
                with fit(data_id=list(range(12))):
                    fit.backward(model(x))
    query = logix.init(path, mode="query")
    query.watch(model)
    with query(data_id=[0, 1]):
        F.cross_entropy(model(x[:2]), y[:2]).backward()
    return logix.open_store(path), query.gradients()


def test_true_fisher_statistics_are_used_when_present(tmp_path):
    store, q = store_with(tmp_path / "t", true_pass=True)
    with pytest.warns(UserWarning, match="holds true-Fisher raw statistics"):
        default = logix.InfluenceEngine(store, "raw", damping=0.1)
    assert default.fisher == "true"
    true = logix.InfluenceEngine(store, "raw", damping=0.1, fisher="true").scores(q).values
    empirical = logix.InfluenceEngine(store, "raw", damping=0.1, fisher="empirical").scores(q).values
    assert torch.equal(default.scores(q).values, true)
    assert not torch.allclose(true, empirical, rtol=1e-3)
    assert logix.InfluenceEngine(store, "identity").fisher == "empirical"


def test_stores_without_them_stay_empirical(tmp_path):
    store, _ = store_with(tmp_path / "e", true_pass=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert logix.InfluenceEngine(store, "raw", damping=0.1).fisher == "empirical"
