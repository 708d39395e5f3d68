"""Whitened projections (kind kfac-whitened): rows equal P_out (S+λ)^{-1/2} ∇W (A+λ)^{-1/2} P_inᵀ
from torch.func gradients and dense factors; with whole sides, `identity` scores are dense K-FAC."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kfac_helpers import SeqNet, make_batches, reference_factors, seq_loss
from torch import nn
from torch.func import functional_call, grad, vmap

import logix
from logix.capture.projection import ModuleProjection, SideProjection, gaussian_matrix
from logix.errors import LogixError

DAMPING = 0.05


def fitted_store(path, model, batches, rank_in, rank_out, fisher="empirical"):
    cfg = {
        "projection": {
            "kind": "kfac-whitened",
            "rank_in": rank_in,
            "rank_out": rank_out,
            "seed": 3,
            "damping": DAMPING,
        },
        "capture": {"loss_reduction": "mean"},
    }
    run = logix.init(path, config=cfg)
    run.watch(model)
    with run.fit_projections(fisher=fisher) as fit:
        for ids, x, y, mask in batches:
            if fisher == "true":
                with fit(data_id=ids, mask=mask):
                    fit.backward(model(x), label_mask=mask)
            else:
                with run(data_id=ids, mask=mask):
                    seq_loss(model(x), y, mask, "mean").backward()
                model.zero_grad()
    for ids, x, y, mask in unpadded(batches):
        with run(data_id=ids, mask=mask):
            seq_loss(model(x), y, mask, "mean").backward()
        model.zero_grad()
    run.finalize()
    return run


def unpadded(batches):
    """The batches with every position real: torch.func's ∇W then equals the logged Σ_t g xᵀ
    (the fit pass keeps the padding: its factors leave padded positions out)."""
    return [(ids, x, y, torch.ones_like(mask)) for ids, x, y, mask in batches]


def dense_whitening(model, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A+λ_A)^{-1/2}, (S+λ_S)^{-1/2} per module from hand-computed factors, by matrix powers of
    torch.linalg.inv and a Cholesky-free symmetric root (eig of the inverse)."""
    whole = {
        n: ModuleProjection(SideProjection(0, 0, None), SideProjection(0, 0, None)) for n in ("fc1", "fc2")
    }
    sums, examples = reference_factors(model, batches, whole)
    out = {}
    for name, (a_sum, s_sum, positions) in sums.items():
        roots = []
        for cov in (a_sum / positions, s_sum / examples):
            lam = DAMPING * float(torch.trace(cov)) / cov.shape[0]
            inv = torch.linalg.inv(cov + lam * torch.eye(cov.shape[0], dtype=torch.float64))
            e, v = torch.linalg.eigh(inv)
            roots.append(v @ torch.diag(e.sqrt()) @ v.T)
        out[name] = tuple(roots)
    return out


def torch_func_grads(model, x, y, mask) -> dict[str, torch.Tensor]:
    """Per-example ∇W [B, d_out, d_in+1] (bias as the last column) of each example's summed
    masked loss, by vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi, mi):
        out = functional_call(model, p, (xi[None],))
        return seq_loss(out, yi[None], mi[None], "sum")

    g = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, x, y, mask)
    return {
        n: torch.cat([g[f"{n}.weight"], g[f"{n}.bias"][..., None]], dim=2).double() for n in ("fc1", "fc2")
    }


def test_whitened_rows_match_dense_reference(tmp_path):
    torch.manual_seed(0)
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(4))
    fitted_store(tmp_path / "w", model, batches, rank_in=3, rank_out=2)
    white = dense_whitening(model, batches)
    store = logix.open_store(tmp_path / "w")
    got = store.load().double()
    want = []
    for ids, x, y, mask in unpadded(batches):
        grads = torch_func_grads(model, x, y, mask)
        blocks = []
        for m in store.modules:
            w_in, w_out = white[m.name]
            p_in = gaussian_matrix(3, m.name, "in", m.r_in, m.d_in).double() @ w_in
            p_out = gaussian_matrix(3, m.name, "out", m.r_out, m.d_out).double() @ w_out
            blocks.append((p_out @ grads[m.name] @ p_in.T).reshape(len(ids), -1))
        want.append(torch.cat(blocks, dim=1))
    want = torch.cat(want)
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert store.manifest["config"]["projection"]["damping"] == DAMPING


def test_whole_sides_give_dense_kfac_influence(tmp_path):
    torch.manual_seed(1)
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(5))
    fitted_store(tmp_path / "w", model, batches, rank_in=64, rank_out=64)
    store = logix.open_store(tmp_path / "w")
    assert all((m.r_in, m.r_out) == (m.d_in, m.d_out) for m in store.modules)
    # Queries: fresh sequences captured with the store's projections.
    qx = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(6))
    qy, qmask = torch.randint(0, 3, (3, 5)), torch.ones(3, 5, dtype=torch.long)
    query = logix.init(tmp_path / "w", mode="query")
    query.watch(model)
    with query(data_id=[0, 1, 2], mask=qmask):
        seq_loss(model(qx), qy, qmask, "mean").backward()
    got = logix.InfluenceEngine(store, preconditioner="identity").scores(query.gradients()).values
    # Dense K-FAC: Σ_m vec(∇q)ᵀ [(S+λ_S)⁻¹ ⊗ (A+λ_A)⁻¹] vec(∇z), each factor damped on its own.
    white = dense_whitening(model, batches)
    gq = torch_func_grads(model, qx, qy, qmask)
    gz = [torch_func_grads(model, x, y, mask) for _, x, y, mask in unpadded(batches)]
    want = 0
    for name, (w_in, w_out) in white.items():
        hinv = torch.kron(w_out @ w_out, w_in @ w_in)
        z = torch.cat([g[name] for g in gz]).reshape(-1, hinv.shape[0])
        want = want + gq[name].reshape(3, -1) @ hinv @ z.T
    assert float((got.double() - want).norm() / want.norm()) < 1e-5


def test_true_fisher_factors_set_the_output_side(tmp_path):
    torch.manual_seed(2)
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(7))
    run = fitted_store(tmp_path / "t", model, batches, rank_in=3, rank_out=2, fisher="true")
    emp = fitted_store(tmp_path / "e", model, batches, rank_in=3, rank_out=2)
    p_true = {c.name: c.projection for c in run._captures}
    p_emp = {c.name: c.projection for c in emp._captures}
    for name in ("fc1", "fc2"):  # same input factor, another (model-label) output factor
        assert torch.allclose(p_true[name].p_in.matrix, p_emp[name].p_in.matrix, atol=1e-6)
        assert not torch.allclose(p_true[name].p_out.matrix, p_emp[name].p_out.matrix, atol=1e-3)
    assert logix.open_store(tmp_path / "t").manifest["projection"]["pca_fisher"] == "true"


def test_zero_damping_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    run = logix.init(tmp_path / "z", config={"projection": {"kind": "kfac-whitened", "damping": 0.0}})
    run.watch(model)
    with pytest.raises(LogixError, match="damping must be > 0"):
        with run.fit_projections():
            with run(data_id=[0, 1]):
                F.mse_loss(model(torch.randn(2, 4)), torch.zeros(2, 3)).backward()
