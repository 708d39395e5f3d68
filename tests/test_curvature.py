"""Curvature statistics (logged vs streamed, per-rank sums, staleness) and preconditioners."""

from __future__ import annotations

import pytest
import torch
from query_helpers import build_store, mlp_modules, mlp_rows, reference_scores

from logix.curvature.covariance import (
    CurvatureStatistics,
    RawAccumulator,
    Statistics,
    check_kinds,
    compute_statistics,
    load_statistics,
    read_statistics,
    statistics_for,
)
from logix.curvature.precondition import (
    build_preconditioner,
    check_choice,
    damping_value,
    eigendecompose,
)
from logix.store.reader import open_store


@pytest.fixture(scope="module")
def data():
    return mlp_modules(), mlp_rows(40, seed=1).float()


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def dense_sums(x, modules):
    x = x.double()
    return {m.name: x[:, m.columns].T @ x[:, m.columns] for m in modules}


def test_raw_accumulator_matches_dense_sum(data):
    modules, x = data
    acc = RawAccumulator(modules)
    acc.update(x[:13])
    acc.update(x[13:])
    assert acc.rows == 40
    for name, ref in dense_sums(x, modules).items():
        assert acc.sums[name].dtype == torch.float64
        torch.testing.assert_close(acc.sums[name], ref, rtol=1e-5, atol=1e-6)


def test_logged_statistics_equal_streaming_recompute(tmp_path, data):
    modules, x = data
    store = open_store(build_store(tmp_path, modules, x, shard_rows=16))
    logged = load_statistics(store.curvature_dir)
    streamed = compute_statistics(store, chunk_rows=7)
    assert logged.rows == streamed.rows == 40
    assert logged.modules == modules
    for m in modules:
        torch.testing.assert_close(logged.tensors[m.name], streamed.tensors[m.name], rtol=1e-5, atol=1e-6)


def test_per_rank_files_are_summed(tmp_path, data):
    modules, x = data
    for rank, part in enumerate((x[:25], x[25:])):
        stats = CurvatureStatistics(tmp_path, modules, rank=rank)
        stats("0", part)
        assert stats.rows("0") == part.shape[0]
        stats.save()
    total = load_statistics(tmp_path / "curvature" / "0")
    assert total.rows == 40 and len(total.sources) == 2
    for name, ref in dense_sums(x, modules).items():
        torch.testing.assert_close(total.tensors[name], ref, rtol=1e-5, atol=1e-6)
    _, md = read_statistics(tmp_path / "curvature" / "0" / "raw-r00001.safetensors")
    assert md["rows"] == "15" and md["kind"] == "raw"


def test_stale_row_count_triggers_recompute(tmp_path, data):
    modules, x = data
    store = open_store(build_store(tmp_path, modules, x, statistics=False))
    # Statistics of only part of the rows, as a crash and resume would leave them.
    partial = CurvatureStatistics(tmp_path, modules)
    partial("0", x[:30])
    partial.save()
    stats = statistics_for(store)
    assert stats.rows == 40 and stats.sources == ["stream"]
    for name, ref in dense_sums(x, modules).items():
        torch.testing.assert_close(stats.tensors[name], ref, rtol=1e-5, atol=1e-6)
    again = statistics_for(store)  # the saved recompute is reused
    assert again.sources[0].endswith("raw-stream.safetensors")


def test_store_without_statistics_recomputes(tmp_path, data):
    modules, x = data
    store = open_store(build_store(tmp_path, modules, x, statistics=False))
    assert load_statistics(store.curvature_dir) is None
    assert statistics_for(store, save=False).rows == 40


def test_kinds_are_checked():
    assert check_kinds(["raw", "identity"]) == ["raw"]
    assert check_kinds(["kfac", "ekfac", "raw"]) == ["raw"]  # factors come from the capture hooks
    with pytest.raises(ValueError, match="unknown curvature statistics"):
        check_kinds(["rwa"])


def test_check_choice_names_closest():
    with pytest.raises(ValueError, match="did you mean 'raw'"):
        check_choice("rwa", ("identity", "raw"), "preconditioner")


@pytest.mark.parametrize("absolute", [False, True])
def test_preconditioner_matches_dense_inverse(tmp_path, data, absolute):
    modules, x = data
    store = open_store(build_store(tmp_path, modules, x))
    pre = build_preconditioner(store, "raw", 0.05, absolute_damping=absolute)
    _, hinv = reference_scores(x[:2], x, modules, 0.05, absolute=absolute)
    q = mlp_rows(3, seed=5)
    # F is summed by float32 products (as logged), the reference in float64.
    assert rel_err(pre.apply(q), q @ hinv) < 1e-5
    quad = pre.quadratic(x.double())
    ref = torch.einsum("nd,de,ne->n", x.double(), hinv, x.double())
    assert rel_err(quad, ref) < 1e-5
    per = pre.quadratic(x.double(), per_module=True)
    assert per.shape == (2, 40)
    torch.testing.assert_close(per.sum(0), quad)


def test_damping_value():
    e = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert damping_value(e, 0.5, absolute=False) == pytest.approx(1.0)
    assert damping_value(e, 0.5, absolute=True) == 0.5
    assert damping_value(torch.zeros(2, dtype=torch.float64), 0.5, absolute=False) == 0.5


def test_eigen_cache_reused_and_invalidated(tmp_path, data, monkeypatch):
    modules, x = data
    sums = dense_sums(x, modules)
    stats = Statistics("raw", modules, 40, dict(sums))
    cache = tmp_path / "eigen-raw.safetensors"
    first = eigendecompose(stats, ["fc1", "fc2"], cache)
    assert cache.exists()

    def fail(*a, **k):
        raise AssertionError("eigh must not run: the cache is valid")

    with monkeypatch.context() as mp:
        mp.setattr(torch.linalg, "eigh", fail)
        again = eigendecompose(Statistics("raw", modules, 40, dict(sums)), ["fc1", "fc2"], cache)
    for name in first:
        torch.testing.assert_close(first[name][1], again[name][1])
    changed = Statistics("raw", modules, 40, {**sums, "fc2": sums["fc2"] * 2})
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(1) or real(a))
    fresh = eigendecompose(changed, ["fc1", "fc2"], cache)
    assert len(calls) == 1  # only fc2's statistics changed
    torch.testing.assert_close(fresh["fc2"][0], first["fc2"][0] * 2)


def test_empty_statistics_damping_must_be_positive(tmp_path, data):
    modules, x = data
    store = open_store(build_store(tmp_path, modules, x))
    with pytest.raises(ValueError, match="damping must be > 0"):
        build_preconditioner(store, "raw", 0.0)


def test_raw_curvature_refuses_blocks_too_wide_to_invert():
    from logix.curvature.covariance import MAX_RAW_WIDTH, RawAccumulator
    from logix.errors import StoreError
    from logix.store.format import ModuleInfo

    wide = ModuleInfo("fc1", "Linear", 129, 128, 129, 128, True, 0)
    assert wide.width > MAX_RAW_WIDTH
    with pytest.raises(StoreError, match="fc1.*preconditioner='identity'"):
        RawAccumulator([wide])
