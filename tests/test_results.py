"""Results as data: short reprs, one id name (`train_ids`), numpy / pandas / CSV / JSON exports
and their round trips, `Scores.top_k` (helpful and harmful) against the engine's own top-k."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch
from query_helpers import build_store, mlp_modules, mlp_rows, queries

import logix
from logix.query.engine import InfluenceEngine
from logix.query.results import Scores, SelfInfluence, TopK
from logix.store.gradients import Gradients

N_TRAIN = 40


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ids = [f"train-{i}" for i in range(N_TRAIN)]
    run_dir = build_store(
        tmp_path_factory.mktemp("results") / "run", mlp_modules(), mlp_rows(N_TRAIN, seed=1), ids
    )
    engine = InfluenceEngine(run_dir, "raw", 0.1)
    q = queries(mlp_rows(3, seed=2), mlp_modules())
    return engine, q, engine.scores(q), engine.top_k(q, k=4), engine.self_influence(per_module=True)


def test_reprs_are_short_and_say_shape_mode_and_a_few_ids(results):
    engine, q, scores, top, si = results
    big = Scores(
        torch.randn(2, 5000), ["a", "b"], list(range(5000)), "relative", None, {"preconditioner": "raw"}
    )
    text = repr(big)
    assert len(text) < 200 and "[2, 5000]" in text and "mode='relative'" in text
    assert "train_ids=[0, 1, 2, … 4997 more]" in text and "preconditioner='raw'" in text
    assert "[3, 4]" in repr(top) and "'train-" in repr(top) and len(repr(top)) < 250
    assert "modules=['fc1', 'fc2']" in repr(si) and "[2, 40]" in repr(si) and "… 37 more" in repr(si)
    g = Gradients(torch.zeros(1000, 39), list(range(1000)), mlp_modules(), "ab" * 32)
    assert repr(g) == "Gradients(values [1000, 39], modules=['fc1', 'fc2'], data_ids=[0, 1, 2, … 997 more])"
    assert "…" in str(big) and len(str(q)) < 200


def test_one_id_name_for_every_result(results):
    _, _, scores, top, si = results
    for r in (scores, top, si):
        assert hasattr(r, "train_ids") and not hasattr(r, "data_ids")
    for r in (scores, top, si):  # the old name is an error naming the new one, never a fallback
        with pytest.raises(AttributeError, match=rf"{type(r).__name__}.train_ids"):
            r.data_ids  # noqa: B018
    assert top.train_ids[0] == [scores.train_ids[j] for j in top.indices[0].tolist()]


def test_to_numpy_and_to_pandas(results):
    _, _, scores, top, si = results
    np.testing.assert_array_equal(scores.to_numpy(), scores.values.numpy())
    values, indices = top.to_numpy()
    np.testing.assert_array_equal(indices, top.indices.numpy())
    df = scores.to_pandas()
    assert list(df.index) == ["q0", "q1", "q2"] and list(df.columns) == scores.train_ids
    assert df.loc["q1", "train-7"] == scores.values[1, 7].item()
    long = top.to_pandas()
    assert list(long.columns) == ["query_id", "rank", "train_id", "index", "score"] and len(long) == 12
    row = long[(long.query_id == "q2") & (long["rank"] == 3)].iloc[0]
    assert row.train_id == top.train_ids[2][2] and row.score == top.values[2, 2].item()
    table = si.to_pandas()
    assert list(table.columns) == ["train_id", "index", "self_influence", "fc1", "fc2"]
    np.testing.assert_allclose(table.self_influence, si.values.sum(0).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(table.fc2, si.values[1].numpy())


def test_to_pandas_without_pandas_names_the_install(results, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install pandas"):
        results[2].to_pandas()


def test_csv_holds_every_value_exactly(results, tmp_path):
    _, _, scores, top, si = results
    with open(scores.save(tmp_path / "s.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["query_id", *scores.train_ids] and [r[0] for r in rows[1:]] == ["q0", "q1", "q2"]
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]], dtype=torch.float32)
    assert torch.equal(got, scores.values)  # 9 significant digits: float32 round-trips exactly
    with open(top.save(tmp_path / "t.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["query_id", "rank", "train_id", "index", "score"] and len(rows) == 13
    assert rows[5][:4] == ["q1", "1", str(top.train_ids[1][0]), str(int(top.indices[1, 0]))]
    assert np.float32(rows[5][4]) == top.values[1, 0].item()
    with open(si.save(tmp_path / "si.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["train_id", "index", "self_influence", "fc1", "fc2"] and len(rows) == N_TRAIN + 1


@pytest.mark.parametrize("suffix", [".json", ".safetensors", ".npz"])
def test_every_result_round_trips_through_logix_load_result(results, tmp_path, suffix):
    _, _, scores, top, si = results
    for r in (scores, top, si):
        back = logix.load_result(r.save(tmp_path / f"{type(r).__name__}{suffix}"))
        assert type(back) is type(r) and back.mode == r.mode and back.train_ids == r.train_ids
        torch.testing.assert_close(back.values, r.values, rtol=0, atol=0)
        if isinstance(r, TopK):
            assert torch.equal(back.indices, r.indices) and back.query_ids == r.query_ids
        if isinstance(r, SelfInfluence):
            assert back.modules == ["fc1", "fc2"]


def test_scores_top_k_equals_the_engines_helpful_and_harmful(results):
    engine, q, scores, top, _ = results
    got = scores.top_k(4)
    assert torch.equal(got.indices, top.indices) and torch.equal(got.values, top.values)
    assert got.train_ids == top.train_ids
    # harmful: the most negative first, which is the top-k of the negated queries
    negated = Gradients(-q.values, q.data_ids, q.modules, q.fingerprint)
    worst = engine.top_k(negated, k=4)
    bad = scores.top_k(4, harmful=True)
    assert torch.equal(bad.indices, worst.indices)
    torch.testing.assert_close(bad.values, -worst.values, rtol=1e-5, atol=1e-6)
    assert (bad.values[:, :-1] <= bad.values[:, 1:]).all()
