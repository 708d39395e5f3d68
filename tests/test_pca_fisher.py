"""True-Fisher PCA: `run.fit_projections(fisher="true")` against dense Gauss–Newton covariances."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.errors import CaptureError

CLASSES = 5


def model_and_data(seq: int | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()
    g = torch.Generator().manual_seed(1)
    shape = (3, 7, 6) if seq is None else (3, 4, seq, 6)  # 3 batches
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.linspace(
        0.2, 2.0, 6, dtype=torch.float64
    )
    y = torch.randint(0, CLASSES, shape[:-1], generator=g)
    return model, x, y


OPEN_RUNS: list = []  # the runs `new_run` made, finalized after each test


@pytest.fixture(autouse=True)
def finalize_runs():
    yield
    while OPEN_RUNS:
        OPEN_RUNS.pop().finalize()


def new_run(path, model):
    run = logix.init(path, config={"projection": {"kind": "pca", "rank_in": 3, "rank_out": 2}})
    OPEN_RUNS.append(run)
    run.watch(model)
    return run, run.covariances  # the sums stay after the pass


def true_pass(run, model, x, masks=None):
    with run.fit_projections(fisher="true") as fit:
        for b in range(x.shape[0]):
            mask = None if masks is None else masks[b]
            with fit(data_id=list(range(10 * b, 10 * b + x.shape[1])), mask=mask):
                fit.backward(model(x[b]), label_mask=mask)
    return fit


def empirical_pass(run, model, x, y, masks=None):
    with run.fit_projections():
        for b in range(x.shape[0]):
            mask = None if masks is None else masks[b]
            with run(data_id=list(range(10 * b, 10 * b + x.shape[1])), mask=mask):
                loss = F.cross_entropy(model(x[b]).flatten(0, -2), y[b].flatten(), reduction="none")
                (loss if mask is None else loss * mask.flatten()).sum().backward()


def dense_output_covariances(model, x, masks=None) -> dict[str, torch.Tensor]:
    """Σ_{n,t} w_{n,t} J_{n,t}ᵀ (diag p − p pᵀ) J_{n,t} at each Linear's output, J = ∂z/∂y by
    jacrev of the rest of the network (the MLP acts per position); w: the 0/1 label mask."""
    with torch.no_grad():
        x = x.reshape(-1, 6)
        y0 = model[0](x)
        y2 = model[2](torch.tanh(y0))
    p = torch.softmax(y2, -1)
    cov = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # [N, C, C]
    if masks is not None:
        cov = cov * masks.reshape(-1, 1, 1).double()
    jac0 = torch.vmap(torch.func.jacrev(lambda y: model[2](torch.tanh(y))))(y0)  # [N, C, 8]
    return {"0": torch.einsum("nci,ncd,ndj->ij", jac0, cov, jac0), "2": cov.sum(0)}


def test_output_covariance_is_the_gauss_newton_factor(tmp_path):
    model, x, _ = model_and_data()
    run, collector = new_run(tmp_path / "r", model)
    fit = true_pass(run, model, x)
    assert fit.passes == 3 * CLASSES
    want = dense_output_covariances(model, x)
    for name in ("0", "2"):
        got = collector.gg[name]
        assert got.dtype == torch.float64
        assert (got - want[name]).abs().max() <= 1e-12 * want[name].abs().max(), name
    # ... and P_out spans its top eigenvectors; the manifest says which Fisher it came from.
    run.finalize()
    p_out = {name: p.p_out.matrix.double() for name, p in run.projections.items()}
    for name in ("0", "2"):
        top = torch.linalg.eigh(want[name])[1][:, -2:]
        assert torch.allclose(p_out[name].T @ (p_out[name] @ top), top, atol=1e-5), name
    assert logix.open_store(tmp_path / "r").manifest["projection"]["pca_fisher"] == "true"


def test_input_covariance_equals_the_empirical_pass_and_differs_on_the_output_side(tmp_path):
    model, x, y = model_and_data()
    true_run, true_stats = new_run(tmp_path / "t", model)
    true_pass(true_run, model, x)
    emp_run, emp_stats = new_run(tmp_path / "e", model)
    empirical_pass(emp_run, model, x, y)
    for name in ("0", "2"):
        assert torch.equal(true_stats.xx[name], emp_stats.xx[name])  # once per forward position
        assert not torch.allclose(true_stats.gg[name], emp_stats.gg[name], rtol=0.05)
    emp_run.finalize()
    assert logix.open_store(tmp_path / "e").manifest["projection"]["pca_fisher"] == "empirical"


def test_sequences_with_label_and_padding_masks(tmp_path):
    model, x, y = model_and_data(seq=5)
    masks = (torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(2)) > 0.3).double()
    run, collector = new_run(tmp_path / "r", model)
    fit = true_pass(run, model, x, masks)
    assert fit.passes == 3 * 5 * CLASSES  # one per position and class slot
    want = dense_output_covariances(model, x, masks)
    for name in ("0", "2"):
        assert (collector.gg[name] - want[name]).abs().max() <= 1e-12 * want[name].abs().max(), name
    emp_run, emp_stats = new_run(tmp_path / "e", model)
    empirical_pass(emp_run, model, x, y, masks)
    for name in ("0", "2"):
        assert torch.equal(collector.xx[name], emp_stats.xx[name])


@pytest.mark.parametrize("frozen", [False, True])
def test_model_parameters_and_grads_are_untouched(tmp_path, frozen):
    model, x, _ = model_and_data()
    for p in model.parameters():
        p.requires_grad_(not frozen)
        p.grad = None if frozen else torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run, collector = new_run(tmp_path / "r", model)
    true_pass(run, model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p in model.parameters():
        assert p.requires_grad is not frozen
        assert p.grad is None if frozen else torch.equal(p.grad, torch.full_like(p, 0.5))
    want = dense_output_covariances(model, x)  # frozen layers' outputs become leaves: same sums
    for name in ("0", "2"):
        assert (collector.gg[name] - want[name]).abs().max() <= 1e-12 * want[name].abs().max()


def test_errors_name_the_fix(tmp_path):
    model, x, y = model_and_data()
    run, _ = new_run(tmp_path / "r", model)
    with pytest.raises(ValueError, match="fisher must be"):
        run.fit_projections(fisher="ture")
    with pytest.raises(CaptureError, match=r"fit.backward\(model\(x\)\)"):
        with run.fit_projections(fisher="true"):
            with run(data_id=list(range(7))):
                F.cross_entropy(model(x[0]), y[0]).backward()
    with run.fit_projections(fisher="true") as fit:
        with pytest.raises(CaptureError, match="inside a `with fit"):
            fit.backward(model(x[0]))
        with pytest.raises(CaptureError, match="logits have 7 examples but data_id has 2"):
            with fit(data_id=[0, 1]):
                fit.backward(model(x[0]))
        with fit(data_id=list(range(7))):
            fit.backward(model(x[0]))
    # A run's pass holds one kind of statistics: a partial true pass cannot turn empirical.
    run2, _ = new_run(tmp_path / "r2", model)
    with pytest.raises(RuntimeError, match="stop"):
        with run2.fit_projections(fisher="true") as fit:
            with fit(data_id=list(range(7))):
                fit.backward(model(x[0]))
            raise RuntimeError("stop")
    with pytest.raises(CaptureError, match="already holds 'true'-Fisher"):
        run2.fit_projections()
