"""Curvature caches are keyed by the content they were derived from (issue #19, finding 3): a
store whose rows were replaced (other weights, the same ids), a cache copied from another store
and a read-only store's in-memory cache of a replaced store are all recomputed, never reused."""

from __future__ import annotations

import shutil

import pytest
import torch
from guarantee_helpers import CONFIG, data, log, model

import logix
import logix.store.cache as cache
from logix.query.engine import InfluenceEngine

N = 24


def _log(run_dir, scale: float):
    """A store of ids 0..N-1 logged with the model's weights scaled by `scale`."""
    with logix.init(run_dir, config=CONFIG) as run:
        m = model()
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale)
        run.watch(m)
        log(run, m, list(range(N)))
    (run_dir / "curvature" / "0" / "raw-r00000.safetensors").unlink()  # raw comes from raw-stream
    return run_dir


def _queries(run_dir):
    query = logix.init(run_dir, mode="query")
    m = model()
    query.watch(m)
    x, y = data([500, 501])
    with query(data_id=[500, 501]):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    return query.gradients()


def _scores(run_dir, kind, q):
    return InfluenceEngine(logix.open_store(run_dir), kind, 0.1).scores(q).values


def _curvature(run_dir):
    return run_dir / "curvature" / "0"


def test_a_raw_stream_cache_of_other_rows_is_recomputed(tmp_path):
    a, b = _log(tmp_path / "a", 1.0), _log(tmp_path / "b", 1.7)
    q = _queries(a)
    expected = _scores(b, "raw", q)
    _scores(a, "raw", q)
    for name in ("raw-stream", "eigen-raw"):  # b's caches replaced by a's (same ids, module table)
        shutil.copy(_curvature(a) / f"{name}.safetensors", _curvature(b) / f"{name}.safetensors")
    torch.testing.assert_close(_scores(b, "raw", q), expected, rtol=1e-6, atol=1e-8)
    for part in ("shards", "index"):  # a re-logged in place: b's rows under a's caches
        shutil.rmtree(a / part)
        shutil.copytree(b / part, a / part)
    torch.testing.assert_close(_scores(a, "raw", q), expected, rtol=1e-6, atol=1e-8)


def test_an_ekfac_stream_cache_of_other_rows_is_recomputed(tmp_path):
    a, b = _log(tmp_path / "a", 1.0), _log(tmp_path / "b", 1.7)
    q = _queries(a)
    shutil.copy(_curvature(a) / "kfac-r00000.safetensors", _curvature(b) / "kfac-r00000.safetensors")
    expected = _scores(b, "ekfac", q)  # b's rows with a's factors: the factors' digests match
    _scores(a, "ekfac", q)
    shutil.copy(_curvature(a) / "ekfac-stream.safetensors", _curvature(b) / "ekfac-stream.safetensors")
    torch.testing.assert_close(_scores(b, "ekfac", q), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["raw", "ekfac"])
def test_an_in_memory_cache_does_not_outlive_its_store(tmp_path, monkeypatch, kind):
    """Caches of a store that cannot be written stay in memory: replacing the store (same path,
    same ids, other rows) must not reuse them."""
    a, b = _log(tmp_path / "a", 1.0), _log(tmp_path / "b", 1.7)
    q = _queries(a)
    shutil.copy(_curvature(a) / "kfac-r00000.safetensors", _curvature(b) / "kfac-r00000.safetensors")
    expected = _scores(b, kind, q)
    for path in (_curvature(a), _curvature(b)):
        for stale in path.glob("*-stream.safetensors"):
            stale.unlink()

    def refuse(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(cache, "write_atomic", refuse)
    monkeypatch.setattr(cache, "_MEMORY", {})
    monkeypatch.setattr(cache, "_NOTICED", set())
    with pytest.warns(UserWarning, match="kept in memory"):
        _scores(a, kind, q)
    assert cache._MEMORY
    shutil.rmtree(a)
    shutil.copytree(b, a)  # the store replaced under the same path
    torch.testing.assert_close(_scores(a, kind, q), expected, rtol=1e-6, atol=1e-8)
