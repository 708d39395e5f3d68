"""EK-FAC-preconditioned refinement converges to the exact raw solve (F + λI)⁻¹q."""

from __future__ import annotations

import pytest
import torch
from kfac_helpers import SeqNet, dense_scores, log_model, make_batches, rel_err
from query_helpers import queries

import logix
from logix.curvature.precondition import build_preconditioner
from logix.curvature.refine import RefinedPreconditioner
from logix.query.engine import InfluenceEngine

pytestmark = pytest.mark.usefixtures("one_thread")


def logged_store(path, projection):
    """24 sequences through SeqNet, logged with K-FAC factors; queries near 3 of them; raw F."""
    torch.manual_seed(0)
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(1), sizes=(8, 8, 8))
    log_model(path, model, batches, projection=projection, statistics=("kfac",))
    store = logix.open_store(path)
    x = store.load().double()
    gen = torch.Generator().manual_seed(5)
    q = x[:3] + 0.1 * torch.randn(3, x.shape[1], generator=gen, dtype=torch.float64)
    fishers = {m.name: x[:, m.columns].T @ x[:, m.columns] / x.shape[0] for m in store.modules}
    return store, x, q, fishers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Exact gradients (identity projection): blocks of 24 and 15 columns. Here EK-FAC is a poor
    fit (the spectrum of P⁻¹(F + λI) for fc1 spans [0.16, 2.84])."""
    return logged_store(tmp_path_factory.mktemp("refine") / "run", {"kind": "identity"})


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """Random projection 3×2: blocks of 6 columns, P⁻¹(F + λI) within [0.6, 1.5]."""
    projection = {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 1}
    return logged_store(tmp_path_factory.mktemp("narrow") / "run", projection)


def solve_error(engine, q, hinv) -> float:
    """Relative error of the refined queries (float64) against the dense (F + λI)⁻¹ q."""
    return rel_err(engine.preconditioner.apply(q), q @ hinv)


def test_fisher_product_is_exact(setup):
    store, _, q, fishers = setup
    refined = RefinedPreconditioner(build_preconditioner(store, "ekfac", 0.1), store, 1, chunk_rows=5)
    fv = refined.fisher_product(q)
    for m in store.modules:
        assert rel_err(fv[:, m.columns], q[:, m.columns] @ fishers[m.name]) < 1e-12


@pytest.mark.parametrize("absolute", [False, True])
def test_cg_refinement_converges_to_raw(setup, absolute):
    store, x, q, fishers = setup
    damping = 0.05 if absolute else 0.1
    ref, hinv = dense_scores(q, x, store.modules, fishers, damping, absolute)
    gq = queries(q, list(store.modules), store.fingerprint)
    plain = InfluenceEngine(
        store, "ekfac", damping, absolute_damping=absolute, chunk_bytes=4 * 7 * store.width
    )
    errors = []
    for k in (0, 4, 20):
        engine = InfluenceEngine(
            store, "ekfac", damping, absolute_damping=absolute, refine=k, chunk_bytes=4 * 7 * store.width
        )
        values = engine.scores(gq).values
        errors.append(solve_error(engine, q, hinv))
        if k == 0:
            torch.testing.assert_close(values, plain.scores(gq).values)  # plain EK-FAC
            assert engine.refinement_residuals is None
        else:
            res = engine.refinement_residuals
            assert res.shape == (k + 1, 3)  # plain EK-FAC, then after each of the k steps
            assert bool((res[-1] < (1e-4 if k == 20 else 1) * res[0]).all())
    assert errors[0] > 1e-2  # EK-FAC alone is not the raw solve here
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6
    assert rel_err(engine.scores(gq).values, ref) < 1e-5  # float32 scores of refined queries


def test_cg_on_narrow_blocks_reaches_the_solve_in_ten_passes(narrow):
    store, x, q, fishers = narrow
    _, hinv = dense_scores(q, x, store.modules, fishers, 0.1)
    plain = InfluenceEngine(store, "ekfac", 0.1)
    refined = InfluenceEngine(store, "ekfac", 0.1, refine=10)
    assert solve_error(plain, q, hinv) > 1e-2
    assert solve_error(refined, q, hinv) < 1e-10


def test_refined_raw_damping_and_residual_definition(setup):
    store, _, q, fishers = setup
    engine = InfluenceEngine(store, "ekfac", 0.1, refine=3)
    raw = build_preconditioner(store, "raw", 0.1)
    for name, lam in engine.preconditioner.dampings.items():
        # λ = 0.1 · trace(F_raw) / w (raw's statistics are float32 sums: agreement to 1e-6)
        assert lam == pytest.approx(raw.dampings[name], rel=1e-6)
    engine.scores(queries(q, list(store.modules), store.fingerprint))
    res = engine.refinement_residuals
    # Row 0 is the residual of plain EK-FAC, measured densely here.
    plain = build_preconditioner(store, "ekfac", 0.1).apply(q)
    for i in range(3):
        r = q[i].clone()
        for m in store.modules:
            lam = engine.preconditioner.dampings[m.name]
            r[m.columns] -= plain[i, m.columns] @ fishers[m.name] + lam * plain[i, m.columns]
        assert float(res[0, i]) == pytest.approx(float(r.norm() / q[i].norm()), rel=1e-6)


def test_richardson_converges_inside_its_spectrum_and_not_outside(narrow, setup):
    store, x, q, fishers = narrow
    _, hinv = dense_scores(q, x, store.modules, fishers, 0.1)
    errors = []
    for k in (1, 5, 40):
        engine = InfluenceEngine(store, "ekfac", 0.1, refine=k, refine_method="richardson")
        errors.append(solve_error(engine, q, hinv))
        assert engine.refinement_residuals.shape == (k, 3)  # x_0 (plain) .. x_{k-1}
    res = engine.refinement_residuals
    assert bool((res[-1] < 1e-8 * res[0]).all())  # P⁻¹(F + λI) within (0, 2): it converges
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8
    # fc1 of the identity store has an eigenvalue 2.84 > 2: Richardson diverges, CG does not.
    store, x, q, fishers = setup
    diverging = InfluenceEngine(store, "ekfac", 0.1, refine=12, refine_method="richardson")
    with pytest.warns(RuntimeWarning, match="residual grew"):
        diverging.preconditioner.apply(q)
    assert bool((diverging.refinement_residuals[-1] > diverging.refinement_residuals[0]).all())
    far = InfluenceEngine(
        store, "ekfac", 0.1, refine=2000, refine_method="richardson", chunk_bytes=4 * 100 * store.width
    )
    with pytest.raises(ValueError, match="diverged to NaN/inf.*refine_method='cg'"):
        far.preconditioner.apply(q)


def test_modes_and_module_subset_with_refinement(setup):
    store, x, q, fishers = setup
    gq = queries(q, list(store.modules), store.fingerprint)
    engine = InfluenceEngine(store, "ekfac", 0.1, refine=12, modules=["fc2"])
    fc2 = [m for m in store.modules if m.name == "fc2"]
    ref, _ = dense_scores(q, x, fc2, fishers, 0.1)
    assert rel_err(engine.scores(gq).values, ref) < 1e-6
    # Train-side norms stay in the EK-FAC metric.
    plain = InfluenceEngine(store, "ekfac", 0.1, modules=["fc2"])
    torch.testing.assert_close(engine.self_influence().values, plain.self_influence().values)
    rel = engine.scores(gq, mode="relative").values
    norms = plain.self_influence(mode="relative").values
    assert rel_err(rel, ref / norms[None, :]) < 1e-5


def test_refine_needs_ekfac(setup):
    store = setup[0]
    with pytest.raises(ValueError, match="needs preconditioner='ekfac'"):
        InfluenceEngine(store, "kfac", 0.1, refine=2)
    with pytest.raises(ValueError, match="refine must be"):
        InfluenceEngine(store, "ekfac", 0.1, refine=-1)
    with pytest.raises(ValueError, match="unknown refine method"):
        InfluenceEngine(store, "ekfac", 0.1, refine=1, refine_method="neumann")
