"""Query preconditioning at the product rate: the eigen block's precomputed inverse equals its
eigenvector products and a dense float64 solve; only the multiplied blocks are upcast (Q' comes
back in the rows' dtype, the identity's is the rows themselves, unselected columns zero); a
query batch is scanned for NaN/inf once, and again only when its values change."""

from __future__ import annotations

import pytest
import torch
from query_helpers import build_store, mlp_modules, mlp_rows, queries, reference_scores

from logix.curvature.preconditioner import INVERSE_AMORTISED_CALLS, Block
from logix.query.engine import InfluenceEngine
from logix.store.reader import open_store


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x = mlp_rows(40, seed=3).float()
    return open_store(build_store(tmp_path_factory.mktemp("pre"), mlp_modules(), x)), x


@pytest.mark.parametrize("n", [1, 2, 3, 64])
def test_inverse_path_equals_eigen_path_and_dense_solve(n):
    gen = torch.Generator().manual_seed(n)
    w = 24
    g = torch.randn(50, w, dtype=torch.float64, generator=gen)
    fisher = g.T @ g / 50
    e, v = torch.linalg.eigh(fisher)
    block = Block(mlp_modules()[0], e.clamp(min=0), v, 0.05)
    q = torch.randn(n, w, dtype=torch.float64, generator=gen)
    dense = torch.linalg.solve(fisher + 0.05 * torch.eye(w, dtype=torch.float64), q.T).T
    products = ((q @ v) / (e.clamp(min=0) + 0.05)) @ v.T
    assert block.uses_inverse(n) == (n * INVERSE_AMORTISED_CALLS >= w)  # 1, 2: products; 3, 64: inverse
    out = block.apply(q)
    assert rel_err(out, dense) < 1e-12
    assert rel_err(out, products) < 1e-12
    assert rel_err(q @ block.inverse(), dense) < 1e-12
    assert torch.equal(block.apply(q), out)  # the same call, the same bits


@pytest.mark.parametrize("kind", ["identity", "raw"])
def test_query_side_upcasts_only_multiplied_blocks(store, kind):
    store, x = store
    engine = InfluenceEngine(store, kind, 0.1, device="cpu", quiet=True)
    q = queries(mlp_rows(6, seed=9), mlp_modules())
    side, quad = engine.preconditioner.query_side(q.values)
    assert side.dense.dtype == torch.float32 and quad.dtype == torch.float64
    if kind == "identity":
        assert side.dense is q.values  # nothing to multiply: no copy at all
    if kind == "identity":
        scores = q.values.double() @ x.double().T
    else:
        scores, _ = reference_scores(q.values, x, mlp_modules(), 0.1)
    assert rel_err(engine.scores(q).values, scores) < 1e-5


def test_unselected_columns_are_zero_without_a_zero_fill(store):
    store, x = store
    engine = InfluenceEngine(store, "raw", 0.1, modules=["fc2"], device="cpu", quiet=True)
    q = queries(mlp_rows(6, seed=9), mlp_modules())
    fc1 = mlp_modules()[0].columns
    for _ in range(3):  # fresh buffers each time, whatever memory they reuse
        side, _ = engine.preconditioner.query_side(q.values)
        assert torch.equal(side.dense[:, fc1], torch.zeros(6, 24))
    only_fc2 = q.values.clone()
    only_fc2[:, fc1] = 0  # block-diagonal (F + λI)⁻¹: fc1's columns contribute nothing
    expected, _ = reference_scores(only_fc2, x, mlp_modules(), 0.1)
    assert rel_err(engine.scores(q).values, expected) < 1e-5


def test_repeat_query_is_scanned_once_and_again_after_a_change(store, monkeypatch):
    store, _ = store
    engine = InfluenceEngine(store, "raw", 0.1, device="cpu", quiet=True)
    q = queries(mlp_rows(4, seed=2), mlp_modules())
    scans = []
    isfinite = torch.isfinite

    def counting(t):
        if t is q.values:
            scans.append(1)
        return isfinite(t)

    monkeypatch.setattr(torch, "isfinite", counting)
    first = engine.scores(q).values
    assert torch.equal(engine.scores(q).values, first)
    assert len(scans) == 1  # the repeat batch is not scanned again
    q.values[1, 3] = float("nan")  # an in-place write: torch bumps the tensor's version
    with pytest.raises(ValueError, match=r"query ids \['q1'\]"):
        engine.scores(q)
    assert len(scans) == 2
    monkeypatch.undo()
    q.values[1, 3] = 0.5
    engine.scores(q)
    q.values.numpy()[2, 0] = float("inf")  # behind torch's back: no version bump
    with pytest.raises(ValueError, match="prepared queries hold NaN/inf"):
        engine.scores(q)
