"""InfluenceEngine against dense float64 references; top-k ties; results; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from query_helpers import (
    build_store,
    mlp_modules,
    mlp_rows,
    queries,
    reference_scores,
    write_manifest,
)

from logix.errors import StoreError
from logix.query.engine import InfluenceEngine
from logix.query.results import load_result
from logix.store.format import ModuleInfo
from logix.store.gradients import Gradients
from logix.store.reader import open_store

N_TRAIN = 45


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    modules = mlp_modules()
    x = mlp_rows(N_TRAIN, seed=1).float()
    q = mlp_rows(4, seed=2).float()
    run = build_store(tmp_path_factory.mktemp("run"), modules, x, shard_rows=16)
    return modules, x, q, open_store(run)


@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_raw_dot_scores_match_dense_solve(setup, chunk_rows):
    modules, x, q, store = setup
    engine = InfluenceEngine(store, "raw", 0.1, chunk_bytes=4 * chunk_rows * store.width, device="cpu")
    ref, _ = reference_scores(q, x, modules, 0.1)
    s = engine.scores(queries(q, modules))
    assert s.values.shape == (4, N_TRAIN)
    assert s.train_ids == list(range(N_TRAIN)) and s.query_ids == ["q0", "q1", "q2", "q3"]
    assert rel_err(s.values, ref) < 1e-4
    per = engine.scores(queries(q, modules), per_module=True)
    assert per.values.shape == (2, 4, N_TRAIN) and per.modules == ["fc1", "fc2"]
    torch.testing.assert_close(per.values.sum(0), s.values, rtol=1e-5, atol=1e-5)
    ref_fc2, _ = reference_scores(
        q[:, 24:], x[:, 24:], [ModuleInfo("fc2", "Linear", 5, 3, 5, 3, True, 0)], 0.1
    )
    assert rel_err(per.values[1], ref_fc2) < 1e-4


def test_cosine_relative_and_self_influence(setup):
    modules, x, q, store = setup
    engine = InfluenceEngine(store, "raw", 0.1, chunk_bytes=4 * 10 * store.width)
    ref, hinv = reference_scores(q, x, modules, 0.1)
    xd, qd = x.double(), q.double()
    self_ref = torch.einsum("nd,de,ne->n", xd, hinv, xd)
    q_self = torch.einsum("nd,de,ne->n", qd, hinv, qd)
    gq = queries(q, modules)
    assert rel_err(engine.scores(gq, mode="relative").values, ref / self_ref.sqrt()) < 1e-4
    cos = engine.scores(gq, mode="cosine").values
    assert rel_err(cos, ref / torch.outer(q_self.sqrt(), self_ref.sqrt())) < 1e-4
    assert float(cos.abs().max()) <= 1 + 1e-5
    per = engine.scores(gq, mode="cosine", per_module=True).values
    torch.testing.assert_close(per.sum(0), cos, rtol=1e-5, atol=1e-6)
    si = engine.self_influence()
    assert si.train_ids == list(range(N_TRAIN))
    assert rel_err(si.values, self_ref) < 1e-4
    assert rel_err(engine.self_influence(mode="relative").values, self_ref.sqrt()) < 1e-4
    per_si = engine.self_influence(per_module=True)
    torch.testing.assert_close(per_si.values.sum(0), si.values, rtol=1e-5, atol=1e-6)
    assert si.top(3)[0][0] == int(torch.argmax(self_ref))


def test_identity_is_plain_dot_and_absolute_damping(setup):
    modules, x, q, store = setup
    plain = (
        InfluenceEngine(store, "identity", chunk_bytes=4 * 8 * store.width).scores(queries(q, modules)).values
    )
    assert rel_err(plain, q.double() @ x.double().T) < 1e-6
    selfinf = InfluenceEngine(store, "identity").self_influence().values
    assert rel_err(selfinf, (x.double() ** 2).sum(1)) < 1e-6
    absolute = InfluenceEngine(store, "raw", 0.01, absolute_damping=True).scores(queries(q, modules))
    ref, _ = reference_scores(q, x, modules, 0.01, absolute=True)
    assert rel_err(absolute.values, ref) < 1e-4


def test_module_subset(setup):
    modules, x, q, store = setup
    engine = InfluenceEngine(store, "raw", 0.1, modules=["fc2"])
    sub = [ModuleInfo("fc2", "Linear", 5, 3, 5, 3, True, 0)]
    ref, _ = reference_scores(q[:, 24:], x[:, 24:], sub, 0.1)
    assert rel_err(engine.scores(queries(q, modules)).values, ref) < 1e-4
    with pytest.raises(ValueError, match="did you mean 'fc1'"):
        InfluenceEngine(store, "raw", modules=["fc_1"])


def stable_topk(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(values, order, axis=1), order


@pytest.mark.parametrize("chunk_rows", [1, 7, 500])
def test_top_k_equals_stable_argsort_with_ties(tmp_path, chunk_rows):
    # Small integers: every score is exact, so duplicated rows give exactly tied scores.
    modules = [ModuleInfo("lin", "Linear", 4, 2, 4, 2, False, 0)]
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (12, 8), generator=gen).float()
    x = torch.cat([base, base[[0, 5, 5, 11]], base[:6]])  # duplicates across chunk boundaries
    q = torch.randint(-2, 3, (5, 8), generator=gen).float()
    q[4] = 0  # a query tied with every train row
    store = open_store(build_store(tmp_path, modules, x, shard_rows=5))
    engine = InfluenceEngine(store, "identity", chunk_bytes=4 * chunk_rows * store.width)
    full = engine.scores(queries(q, modules)).values.numpy()
    for k in (1, 6, x.shape[0]):
        top = engine.top_k(queries(q, modules), k=k)
        ref_v, ref_i = stable_topk(full, k)
        assert top.indices.shape == (5, k)
        np.testing.assert_array_equal(top.indices.numpy(), ref_i)
        np.testing.assert_array_equal(top.values.numpy(), ref_v)
        assert top.train_ids == [[store.data_ids[j] for j in row] for row in ref_i]


def test_top_k_raw_and_k_above_rows(setup):
    modules, x, q, store = setup
    engine = InfluenceEngine(store, "raw", 0.1, chunk_bytes=4 * 6 * store.width)
    for mode in ("dot", "cosine", "relative"):
        full = engine.scores(queries(q, modules), mode=mode).values.numpy()
        top = engine.top_k(queries(q, modules), k=5, mode=mode)
        ref_v, ref_i = stable_topk(full, 5)
        np.testing.assert_array_equal(top.indices.numpy(), ref_i)
        np.testing.assert_allclose(top.values.numpy(), ref_v, rtol=1e-6)
    everything = engine.top_k(queries(q, modules), k=10 * N_TRAIN)  # clamped to all rows
    assert everything.values.shape == (4, N_TRAIN)
    with pytest.raises(ValueError, match="k must be at least 1"):
        engine.top_k(queries(q, modules), k=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_results_round_trip(setup, tmp_path, suffix):
    modules, x, q, store = setup
    engine = InfluenceEngine(store, "raw", 0.1)
    gq = queries(q, modules)
    for result in (engine.scores(gq), engine.top_k(gq, k=3), engine.self_influence()):
        back = load_result(result.save(tmp_path / f"r{suffix}"))
        assert type(back) is type(result)
        torch.testing.assert_close(back.values, result.values)
        for name in ("query_ids", "train_ids"):
            if hasattr(result, name):
                assert getattr(back, name) == getattr(result, name)
    engine.top_k(gq, k=3).save(tmp_path / "top.json")
    assert (tmp_path / "top.json").read_text().count("query_id") == 4
    with pytest.raises(ValueError, match="ending in .safetensors / .npz / .json / .csv"):
        engine.scores(gq).save(tmp_path / "scores.txt")


def test_float16_store(tmp_path):
    modules = mlp_modules()
    x, q = mlp_rows(30, seed=1).float(), mlp_rows(2, seed=2).float()
    store = open_store(build_store(tmp_path, modules, x, dtype="float16"))
    ref, _ = reference_scores(q, x.half().float(), modules, 0.1)
    values = (
        InfluenceEngine(store, "raw", 0.1, chunk_bytes=4 * 8 * store.width).scores(queries(q, modules)).values
    )
    assert rel_err(values, ref) < 1e-3  # logged statistics saw the float32 rows


# ---------------------------------------------------------------------------------- errors
def test_bad_queries_are_rejected(setup):
    modules, x, q, store = setup
    engine = InfluenceEngine(store, "raw", 0.1)
    with pytest.raises(StoreError, match="other projections or another model"):
        engine.scores(queries(q, modules, fingerprint="cd" * 32))
    other = [
        ModuleInfo("fc1", "Linear", 6, 4, 6, 4, True, 0),
        ModuleInfo("fc3", "Linear", 5, 3, 5, 3, True, 24),
    ]
    with pytest.raises(StoreError, match="module table differs"):
        engine.top_k(queries(q, other))
    bad = q.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf \(query ids \['q2'\]\)"):
        engine.top_k(queries(bad, modules))
    with pytest.raises(StoreError, match=r"\[n, 39\]"):
        engine.scores(torch.zeros(2, 10))
    with pytest.raises(TypeError, match="Gradients"):
        engine.scores([[0.0] * 39])
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        engine.scores(queries(q, modules), mode="cosin")
    with pytest.raises(ValueError, match="self-influence mode"):
        engine.self_influence(mode="cosine")
    with pytest.raises(ValueError, match="no query rows"):
        engine.scores(Gradients(torch.zeros(0, 39), [], modules, store.fingerprint))


def test_bad_engine_arguments(setup, tmp_path):
    modules, x, q, store = setup
    with pytest.raises(ValueError, match="did you mean 'identity'"):
        InfluenceEngine(store, "identiy")
    with pytest.raises(ValueError, match="chunk_bytes"):
        InfluenceEngine(store, "raw", chunk_bytes=0)
    empty = open_store(write_manifest(tmp_path / "empty", modules))
    with pytest.raises(StoreError, match="has no rows"):
        InfluenceEngine(empty, "identity")
    with pytest.raises(StoreError, match="not a logix store"):
        InfluenceEngine(tmp_path / "missing")
