"""One query path: segment-combined and stage-wise scores read the store's `query:` defaults and
check queries through the engine; the removed shims stay removed; `logix.unroll` is its package."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.query.segments import combined_scores
from logix.query.stagewise import stagewise_scores

CFG = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "sum"}}
SEGMENTS = {"s1": ({"lr": 0.1, "steps": 30}, range(0, 10)), "s2": ({"lr": 0.05, "steps": 20}, range(4, 12))}


def _batch(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x, y = 2 * torch.randn(12, 4, generator=g), torch.randint(0, 2, (12,), generator=g)
    return x[ids], y[ids]


@pytest.fixture(scope="module")
def store_with_query_section(tmp_path_factory):
    """Two segments logged with `query: {preconditioner: identity, damping: 0.3}` in the config;
    query gradients of the final model."""
    path = tmp_path_factory.mktemp("onepath") / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    run = logix.init(path, config={**CFG, "query": {"preconditioner": "identity", "damping": 0.3}})
    run.watch(model)
    for name, (meta, ids) in SEGMENTS.items():
        run.start_segment(name, **meta)
        x, y = _batch(list(ids))
        with run(data_id=list(ids)):
            F.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad()
    run.finalize()
    query = logix.init(path, mode="query")
    query.watch(model)
    x, y = _batch([0, 5, 11])
    with query(data_id=["q0", "q1", "q2"]):
        F.cross_entropy(model(x), y, reduction="sum").backward()
    model.zero_grad()
    return logix.open_store(path), query.gradients()


def test_combined_scores_take_the_stores_query_defaults(store_with_query_section):
    store, q = store_with_query_section
    got = combined_scores(store, {"s1": q, "s2": q}, missing="zero")
    # identity (the store's default, not a hard-coded raw): Σ_s lr_s · q · g_s, by id
    expect = torch.zeros(3, 12, dtype=torch.float64)
    for name, (meta, _) in SEGMENTS.items():
        seg = store.select(name)
        part = meta["lr"] * q.values.double() @ seg.load().double().T
        for j, tid in enumerate(seg.data_ids):
            expect[:, tid] += part[:, j]
    assert got.train_ids == list(range(12))
    assert got.meta["preconditioner"] == "identity"
    torch.testing.assert_close(got.values.double(), expect, rtol=1e-5, atol=1e-6)
    raw = combined_scores(store, {"s1": q, "s2": q}, missing="zero", preconditioner="raw", mode="cosine")
    assert raw.meta["preconditioner"] == "raw" and raw.mode == "cosine" and raw.meta["damping"] == 0.3


def test_stagewise_scores_take_the_stores_damping(store_with_query_section):
    store, q = store_with_query_section
    got = stagewise_scores(store, q)
    assert got.meta["damping"] == 0.3  # the store's `query: damping`, not a hard-coded 0.1
    explicit = stagewise_scores(store, q, damping=0.3)
    assert torch.equal(got.values, explicit.values)
    assert not torch.allclose(got.values, stagewise_scores(store, q, damping=0.1).values, rtol=1e-3)


def test_stagewise_queries_get_the_engines_checks(store_with_query_section):
    store, q = store_with_query_section
    bad = q.values.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        stagewise_scores(store, bad)
    with pytest.raises(logix.StoreError, match=r"\[n, "):
        stagewise_scores(store, q.values[:, :-1])
    rows = stagewise_scores(store, q.values)  # rows as a tensor, as the engine takes them
    assert torch.equal(rows.values, stagewise_scores(store, q).values)
    with pytest.raises(logix.ConfigError, match="form='eigen'"):
        logix.InfluenceEngine(store.select("s1"), "raw", form="gram").scores(q, prepared=True)


def test_spectral_with_the_inverse_is_the_preconditioner(store_with_query_section):
    store, q = store_with_query_section
    engine = logix.InfluenceEngine(store.select("s1"), "raw", 0.2, form="eigen")
    pre = engine.preconditioner
    v = q.values.double()
    torch.testing.assert_close(pre.spectral(v, lambda e: 1 / e), pre.apply(v), rtol=1e-10, atol=1e-12)
    # and against a dense solve of one module's block (F + λI)⁻¹ with F = GᵀG / N
    m = pre.selected[0]
    g = store.select("s1").load().double()[:, m.columns]
    fisher = g.T @ g / g.shape[0]
    lam = 0.2 * torch.trace(fisher) / m.width
    dense = torch.linalg.solve(fisher + lam * torch.eye(m.width, dtype=torch.float64), v[:, m.columns].T).T
    torch.testing.assert_close(pre.spectral(v, lambda e: 1 / e)[:, m.columns], dense, rtol=1e-4, atol=1e-6)


def test_removed_shims_stay_removed(store_with_query_section):
    store, q = store_with_query_section
    for old in ({"chunk_rows": 4}, {"damping_absolute": True}):
        with pytest.raises(TypeError, match=next(iter(old))):
            stagewise_scores(store, q, **old)
    with pytest.raises(TypeError, match="absolute"):
        from logix.curvature.precondition import build_preconditioner

        build_preconditioner(store, "raw", 0.1, absolute=True)
    with pytest.raises(AttributeError):
        logix.run.Step  # noqa: B018


def test_unroll_is_its_package_in_a_fresh_process():
    code = (
        "import logix, logix.unroll.replay as r, types\n"
        "from logix.unroll import unroll\n"
        "assert isinstance(logix.unroll, types.ModuleType) and logix.unroll.replay is r\n"
        "assert logix.unroll.unroll is unroll is r.unroll and callable(unroll)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
