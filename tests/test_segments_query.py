"""TracIn-CP over segments: the lr-weighted sum of per-segment scores, aligned by data id."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.query.segments import combined_scores


def test_combined_scores_are_the_lr_weighted_sum_aligned_by_id(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    xq, yq = torch.randn(4, 5), torch.randint(0, 3, (4,))
    cfg = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "sum"}}
    queries, lrs = {}, {"ep0": 0.5, "ep1": 0.2}
    run = logix.init(tmp_path / "r", config=cfg)
    run.watch(model)
    for epoch, (name, lr) in enumerate(lrs.items()):
        run.start_segment(name, lr=lr)
        order = torch.randperm(20, generator=torch.Generator().manual_seed(epoch))  # shuffled
        for b in range(0, 20, 5):
            idx = order[b : b + 5]
            with run(data_id=[f"t{i}" for i in idx.tolist()]):
                F.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
        run.flush()
        # queries at this checkpoint (before the optimizer moves on)
        q = logix.init(tmp_path / "r", mode="query")
        q.watch(model)
        with q(data_id=["q0", "q1", "q2", "q3"]):
            F.cross_entropy(model(xq), yq, reduction="sum").backward()
        queries[name] = q.gradients()
        model.zero_grad()
        with torch.no_grad():  # a visible change between the checkpoints
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    run.finalize()
    store = logix.open_store(tmp_path / "r")
    got = combined_scores(store, queries, preconditioner="identity")
    assert got.train_ids == store.select("ep0").data_ids
    # reference: per-example gradient dot products computed from the rows by id
    expect = torch.zeros(4, 20, dtype=torch.float64)
    for name, lr in lrs.items():
        seg = store.select(name)
        rows = dict(zip(seg.data_ids, seg.load().double()))
        train = torch.stack([rows[t] for t in got.train_ids])
        expect += lr * queries[name].values.double() @ train.T
    torch.testing.assert_close(got.values.double(), expect, rtol=1e-5, atol=1e-6)
    assert got.meta["weights"] == lrs

    with pytest.raises(ValueError, match="weights has no entry"):
        combined_scores(store, queries, preconditioner="identity", weights={"ep0": 1.0})
    twice = combined_scores(store, queries, preconditioner="identity", weights={"ep0": 2.0, "ep1": 0.0})
    single = logix.InfluenceEngine(store.select("ep0"), "identity").scores(queries["ep0"])
    torch.testing.assert_close(twice.values, 2 * single.values)  # same column order: ep0's
