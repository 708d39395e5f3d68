"""True-Fisher K-FAC and EK-FAC: factors against dense sums of Jacobians (no pseudo-gradients),
EK-FAC eigenvalues from a second pass against those derived from raw, scores against dense
solves, and errors that name the missing pass."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from kfac_helpers import dense_scores, kron_fisher, rel_err
from test_true_fisher import (
    PROJ,
    classifier,
    classifier_batches,
    dense_fisher,
    fitted,
    logged_classifier,
    logit_covariance,
    projected_jacobian,
    projections_of,
    sequence_batch,
)
from torch.func import functional_call

import logix
from logix.curvature.covariance import load_statistics
from logix.errors import StoreError


def dense_factors(model, names, inputs, pad, weights, projections):
    """{module: (A, S, positions)} with S = Σ_{n,t} w_t² Σ_t' J̃_{t'}ᵀ (diag p − ppᵀ) J̃_{t'}, where
    J̃_{t'} = P_out ∂z_t/∂y_{t'} is built row by row (one backward per logit), and A = Σ x̃x̃ᵀ."""
    modules = dict(model.named_modules())
    ins, outs = {}, {}

    def keep(name, module, args, output):
        ins[name], outs[name] = args[0], output

    handles = [modules[n].register_forward_hook(partial(keep, n)) for n in names]
    z = model(inputs)
    for h in handles:
        h.remove()
    z3 = z if z.ndim == 3 else z.unsqueeze(1)
    batch, positions, classes = z3.shape
    pad = torch.ones(batch, positions) if pad is None else pad.double()
    weights = torch.ones(batch, positions) if weights is None else weights.double()
    p = torch.softmax(z3.detach().double(), -1)
    out = {}
    for n in names:
        module, proj = modules[n], projections[n]
        if isinstance(module, torch.nn.Embedding):
            x = F.one_hot(ins[n], module.num_embeddings).double()
        else:
            x = torch.cat([ins[n], torch.ones_like(ins[n][..., :1])], -1).detach().double()
        x = x.reshape(batch, -1, x.shape[-1]) @ proj.p_in.matrix.double().T
        x = x * pad[:, : x.shape[1], None] if x.shape[1] > 1 else x
        out[n] = [
            x.reshape(-1, x.shape[-1]).T @ x.reshape(-1, x.shape[-1]),
            0.0,
            int(pad.sum()) if x.shape[1] > 1 else batch,
        ]
    for t in range(positions):
        cov = torch.diag_embed(p[:, t]) - p[:, t, :, None] * p[:, t, None, :]  # [B, V, V]
        cov = cov * (weights[:, t] ** 2)[:, None, None]
        rows = [
            torch.autograd.grad(z3[:, t, v].sum(), [outs[n] for n in names], retain_graph=True)
            for v in range(classes)
        ]
        for i, n in enumerate(names):
            jac = torch.stack(
                [r[i].double().reshape(batch, -1, r[i].shape[-1]) for r in rows]
            )  # [V, B, T', d]
            jac = (jac @ projections[n].p_out.matrix.double().T) * pad[None, :, : jac.shape[2], None]
            out[n][1] = out[n][1] + torch.einsum("vbtr,bvu,ubts->rs", jac, cov, jac)
    return {n: tuple(v) for n, v in out.items()}


def test_true_kfac_factors_equal_dense_sums(tmp_path):
    model, tokens, pad, labels = sequence_batch()
    batches = [([0, 1], tokens[:2], labels[:2], pad[:2]), ([2], tokens[2:], labels[2:], pad[2:])]
    run, fit = fitted(tmp_path / "r", model, batches, statistics=("kfac",))
    run.finalize()
    stats = load_statistics(tmp_path / "r" / "curvature" / "0", "kfac.true")
    assert stats.kind == "kfac.true" and stats.rows == 3 and fit.pseudo_rows == 0  # no G̃ formed
    names = [m.name for m in run.modules]
    want = {n: [0, 0, 0] for n in names}
    for _, tok, lab, pm in batches:
        for n, (a, s, count) in dense_factors(model, names, tok, pm, lab, projections_of(run)).items():
            want[n] = [want[n][0] + a, want[n][1] + s, want[n][2] + count]
    for n in names:
        assert rel_err(stats.tensors[f"{n}.A"], want[n][0]) < 1e-5, n  # A once per position
        assert rel_err(stats.tensors[f"{n}.S"], want[n][1]) < 1e-5, n
        assert stats.positions[n] == want[n][2] == int(pad.sum())


@pytest.fixture()
def classifier_store(tmp_path):
    """A classifier store (sum-reduced rows), query gradients, and the dense true-Fisher pieces."""
    model, x, y, run = logged_classifier(tmp_path / "r")
    run.finalize()
    xq = torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    q = logix.init(tmp_path / "r", mode="query")
    q.watch(model)
    with q(data_id=["a", "b", "c"]):
        F.cross_entropy(model(xq), torch.tensor([0, 1, 2]), reduction="sum").backward()
    names = [m.name for m in run.modules]
    factors = dense_factors(model, names, x, None, None, projections_of(q))
    return tmp_path / "r", model, x, q.gradients(), factors


def true_pass(path, model, x, statistics):
    run = logix.init(path, resume=True)
    run.watch(model)
    with run.fit_curvature(fisher="true", statistics=statistics) as fit:
        for ids, inputs, _, _ in classifier_batches(x):
            with fit(data_id=ids):
                fit.backward(model(inputs))
    run.finalize()


def kronecker_eigen(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """R = Q_S ⊗ Q_A from the eigenvectors of the two factors [w, w]."""
    return torch.kron(torch.linalg.eigh(s)[1], torch.linalg.eigh(a)[1])


def test_true_kfac_and_ekfac_scores_equal_dense_solves(classifier_store):
    path, model, x, queries, factors = classifier_store
    true_pass(path, model, x, ["raw", "kfac"])
    true_pass(path, model, x, ["ekfac"])
    store = logix.open_store(path)
    rows = store.load().double()
    run = logix.init(path, mode="query")
    run.watch(model)

    def fn(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = projected_jacobian(model, run.modules, projections_of(run), fn, x)
    dense = dense_fisher(jac, logit_covariance(model(x).detach()), run.modules)
    kfac_fishers, ekfac_fishers = {}, {}
    for m in store.modules:
        a, s, count = factors[m.name]
        a, s = a / count, s / 10
        kfac_fishers[m.name] = torch.kron(s, a)
        r = kronecker_eigen(a, s)
        lam = ((r.T @ (dense[m.name] / 10)) * r.T).sum(1)  # diag(Rᵀ F R), F the dense true Fisher
        ekfac_fishers[m.name] = r @ torch.diag(lam) @ r.T
    stats = load_statistics(store.curvature_dir, "kfac.true")
    for m in store.modules:
        assert rel_err(kron_fisher(stats, m.name), kfac_fishers[m.name]) < 1e-5
    for kind, fishers in (("kfac", kfac_fishers), ("ekfac", ekfac_fishers)):
        got = logix.InfluenceEngine(store, kind, damping=0.1, fisher="true").scores(queries)
        want, _ = dense_scores(queries.values, rows, store.modules, fishers, 0.1)
        assert rel_err(got.values, want) < 1e-4, kind
        assert got.meta["fisher"] == "true"


def test_ekfac_eigenvalues_from_the_second_pass_equal_those_from_raw(classifier_store):
    path, model, x, queries, _ = classifier_store
    true_pass(path, model, x, ["raw", "kfac"])
    store = logix.open_store(path)
    from_raw = logix.InfluenceEngine(store, "ekfac", damping=0.1, fisher="true")
    true_pass(path, model, x, ["ekfac"])
    from_pass = logix.InfluenceEngine(store, "ekfac", damping=0.1, fisher="true")
    for name, block in from_pass.preconditioner.blocks.items():
        other = from_raw.preconditioner.blocks[name]
        assert rel_err(block.eigenvalues, other.eigenvalues) < 1e-6
    (store.curvature_dir / "raw.true-r00000.safetensors").unlink()  # the pass's values suffice
    alone = logix.InfluenceEngine(store, "ekfac", damping=0.1, fisher="true").scores(queries)
    assert rel_err(alone.values, from_raw.scores(queries).values) < 1e-5


def test_ekfac_names_the_missing_pass_and_refuses_stale_bases(classifier_store):
    path, model, x, _, _ = classifier_store
    run = logix.init(path, resume=True)
    run.watch(model)
    with pytest.raises(StoreError, match=r"statistics=\['kfac'\]\) before this one"):
        run.fit_curvature(fisher="true", statistics=["ekfac"])
    with pytest.raises(ValueError, match="then one with"):
        run.fit_curvature(fisher="true", statistics=["kfac", "ekfac"])
    run.finalize()
    true_pass(path, model, x, ["kfac"])
    with pytest.raises(StoreError, match=r"statistics=\['ekfac'\]"):
        logix.InfluenceEngine(path, "ekfac", fisher="true")
    true_pass(path, model, x, ["ekfac"])
    logix.InfluenceEngine(path, "ekfac", fisher="true")  # now complete
    true_pass(path, model, x[:6], ["kfac"])  # new factors: the refitted eigenvalues are stale
    with pytest.raises(StoreError, match=r"statistics=\['ekfac'\]"):
        logix.InfluenceEngine(path, "ekfac", fisher="true")
    with pytest.raises(ValueError, match="cannot refine"):
        logix.InfluenceEngine(path, "ekfac", fisher="true", refine=1)


def test_true_kfac_pass_keeps_the_empirical_factors_apart(tmp_path):
    model, x, y = classifier()
    cfg = {"projection": PROJ, "curvature": {"statistics": ["kfac"]}}
    with logix.init(tmp_path / "r", config=cfg) as run:
        run.watch(model)
        with run(data_id=list(range(10))):
            F.cross_entropy(model(x), y).backward()
    before = load_statistics(tmp_path / "r" / "curvature" / "0", "kfac")
    true_pass(tmp_path / "r", model, x, ["kfac"])
    after = load_statistics(tmp_path / "r" / "curvature" / "0", "kfac")
    for key in before.tensors:
        assert torch.equal(before.tensors[key], after.tensors[key])
    true = load_statistics(tmp_path / "r" / "curvature" / "0", "kfac.true")
    assert rel_err(true.tensors["fc2.S"], after.tensors["fc2.S"]) > 1e-2  # model vs data labels
    assert rel_err(true.tensors["fc1.A"], after.tensors["fc1.A"]) < 1e-6  # the same inputs
