"""Whitened projections from supplied Kronecker factors (Shampoo/SOAP-style L, R): rows equal
G_out (L+λ)^{-p} ∇W (R+λ)^{-p} G_inᵀ built densely from torch.func gradients and the factors."""

from __future__ import annotations

import pytest
import torch
from kfac_helpers import SeqNet, make_batches, seq_loss
from test_whitening import torch_func_grads, unpadded

import logix
from logix.capture.kronecker import KroneckerFactors
from logix.capture.projection import gaussian_matrix
from logix.errors import CaptureError

DAMPING = 0.1
CFG = {
    "projection": {"kind": "kfac-whitened", "rank_in": 3, "rank_out": 2, "seed": 7, "damping": DAMPING},
    "capture": {"loss_reduction": "mean"},
}


def random_spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d + 2, generator=gen, dtype=torch.float64)
    return a @ a.T / d


def dense_power(c: torch.Tensor, power: float) -> torch.Tensor:
    """(C + λI)^{-power}, λ = damping · tr(C)/d, through an eigendecomposition of C + λI itself."""
    if c.ndim == 1:
        return (c + DAMPING * float(c.mean())).pow(-power).diag()
    lam = DAMPING * float(torch.trace(c)) / c.shape[0]
    e, v = torch.linalg.eigh(c + lam * torch.eye(c.shape[0], dtype=torch.float64))
    return v @ torch.diag(e.pow(-power)) @ v.T


@pytest.mark.parametrize("power", [0.5, 0.125])
def test_supplied_factor_rows_match_dense(tmp_path, power):
    torch.manual_seed(0)
    model = SeqNet()
    batches = unpadded(make_batches(torch.Generator().manual_seed(2)))
    gen = torch.Generator().manual_seed(9)
    run = logix.init(tmp_path / "k", config=CFG)
    run.watch(model)
    factors = {}
    for m in run.modules:  # fc2's right factor as a diagonal, to cover that form too
        right = random_spd(m.d_in, gen)
        factors[m.name] = KroneckerFactors(
            random_spd(m.d_out, gen), right.diag() if m.name == "fc2" else right
        )
    run.use_kronecker_factors(factors, power=power)
    for ids, x, y, mask in batches:
        with run(data_id=ids, mask=mask):
            seq_loss(model(x), y, mask, "mean").backward()
        model.zero_grad()
    run.finalize()
    store = logix.open_store(tmp_path / "k")
    assert store.manifest["projection"]["whitening_power"] == power
    got = store.load().double()
    want = []
    for ids, x, y, mask in batches:
        grads = torch_func_grads(model, x, y, mask)
        blocks = []
        for m in store.modules:
            f = factors[m.name]
            p_in = gaussian_matrix(7, m.name, "in", m.r_in, m.d_in).double() @ dense_power(
                f.right.double(), power
            )
            p_out = gaussian_matrix(7, m.name, "out", m.r_out, m.d_out).double() @ dense_power(f.left, power)
            blocks.append((p_out @ grads[m.name] @ p_in.T).reshape(len(ids), -1))
        want.append(torch.cat(blocks, dim=1))
    want = torch.cat(want)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_factor_errors_name_the_fix(tmp_path):
    model = SeqNet()
    run = logix.init(tmp_path / "k", config=CFG)
    run.watch(model)
    fc1 = KroneckerFactors(torch.eye(4), torch.eye(5))  # fc1's right side has d_in + 1 = 6 columns
    with pytest.raises(CaptureError, match=r"expected \(6, 6\) or \(6,\): d_in \(with the bias column"):
        run.use_kronecker_factors({"fc1": fc1, "fc2": KroneckerFactors(torch.eye(3), torch.eye(5))})
    with pytest.raises(CaptureError, match=r"missing \['fc2'\]"):
        run.use_kronecker_factors({"fc1": KroneckerFactors(torch.eye(4), torch.eye(6))})
    random_run = logix.init(tmp_path / "r", config={"projection": {"kind": "random"}})
    random_run.watch(SeqNet())
    with pytest.raises(CaptureError, match="projection.kind 'kfac-whitened'"):
        random_run.use_kronecker_factors({})
    random_run.finalize()
