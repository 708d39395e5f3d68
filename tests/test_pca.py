"""PCA projections: a statistics pass, top eigenvectors of dense covariances, exact rows after."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import per_example_grads, projected_rows
from torch import nn

import logix
from logix.errors import CaptureError


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 6, generator=g) * torch.linspace(0.2, 2.0, 6)  # anisotropic inputs
    y = torch.randint(0, 5, (3, 10), generator=g)
    return model, x, y


def fitted_run(path, model, x, y, reduction="mean"):
    cfg = {
        "projection": {"kind": "pca", "rank_in": 3, "rank_out": 2},
        "capture": {"loss_reduction": reduction},
    }
    run = logix.init(path, config=cfg)
    run.watch(model)
    with run.fit_projections():
        for b in range(3):
            with run(data_id=list(range(10 * b, 10 * b + 10))):
                loss = F.cross_entropy(model(x[b]), y[b], reduction=reduction)
                loss.backward()
    return run


def test_projections_are_top_eigenvectors_of_dense_covariances(tmp_path):
    model, x, y = model_and_data()
    run = fitted_run(tmp_path / "r", model, x, y)
    run.finalize()
    projections = run.projections
    # Dense references: E[x xᵀ] with the bias 1 appended, and E[g gᵀ] of per-example gradients.
    inputs = torch.cat([x.reshape(-1, 6), torch.ones(30, 1)], 1).double()
    hidden = torch.tanh(model[0](x.reshape(-1, 6))).detach()
    h_inputs = torch.cat([hidden, torch.ones(30, 1)], 1).double()
    out = model(x.reshape(-1, 6))
    g_out = torch.softmax(out, 1) - F.one_hot(y.reshape(-1), 5)  # ∂ℓ_n/∂logits
    g_hidden = (g_out @ model[2].weight) * (1 - hidden**2)
    for name, cov_in, cov_out in (
        ("0", inputs.T @ inputs, g_hidden.double().T @ g_hidden.double()),
        ("2", h_inputs.T @ h_inputs, g_out.double().T @ g_out.double()),
    ):
        for side, cov, r in (("in", cov_in, 3), ("out", cov_out, 2)):
            p = getattr(projections[name], f"p_{side}").matrix.double()
            evals, evecs = torch.linalg.eigh(cov)
            top = evecs[:, -r:]
            # the same subspace: projecting the top eigenvectors onto P's rows loses nothing
            assert torch.allclose(p @ p.T, torch.eye(r, dtype=torch.float64), atol=1e-5)
            assert torch.allclose((p.T @ (p @ top)), top, atol=1e-4), (name, side)


def test_rows_after_fitting_match_torch_func(tmp_path):
    model, x, y = model_and_data()
    run = fitted_run(tmp_path / "r", model, x, y, reduction="sum")
    run.finalize()
    q = logix.init(tmp_path / "r", mode="query")
    q.watch(model)
    with q(data_id=list(range(10))):
        F.cross_entropy(model(x[0]), y[0], reduction="sum").backward()
    grads = per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), (x[0],), y[0])
    want = projected_rows(model, q.modules, q.projections, grads)
    got = q.gradients().values.double()
    assert (got - want).norm() / want.norm() < 1e-5
    assert logix.open_store(tmp_path / "r").manifest["projection"]["kind"] == "pca"


def test_logging_before_fitting_is_an_error(tmp_path):
    model, x, y = model_and_data()
    run = logix.init(tmp_path / "r", config={"projection": {"kind": "pca"}})
    run.watch(model)
    with pytest.raises(CaptureError, match="fit_projections"):
        with run(data_id=list(range(10))):
            F.cross_entropy(model(x[0]), y[0]).backward()
    assert not (tmp_path / "r" / "manifest.json").exists()
    other = logix.init(tmp_path / "s")
    other.watch(model)
    with pytest.raises(CaptureError, match="kind 'pca'"):
        other.fit_projections()
    other.finalize()


def test_fitting_then_logging_in_one_run(tmp_path):
    model, x, y = model_and_data()
    run = fitted_run(tmp_path / "r", model, x, y)
    for b in range(3):
        with run(data_id=list(range(10 * b, 10 * b + 10))):
            F.cross_entropy(model(x[b]), y[b]).backward()
    run.finalize()
    store = logix.open_store(tmp_path / "r")
    assert len(store) == 30 and store.width == 3 * 2 * 2


def test_covariances_of_conv_and_embedding_layers_match_dense_sums():
    """The statistics behind PCA: Σ x xᵀ over unfolded patches / token counts, Σ g gᵀ over
    positions, equal sums computed directly from the layers' inputs and output gradients."""
    from logix.capture.hooks import CaptureBlock, ModuleCapture, attach_hooks
    from logix.capture.pca import CovarianceSink, top_directions

    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    emb = nn.Embedding(7, 4, padding_idx=0)
    images = torch.randn(4, 2, 6, 6)
    tokens = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 6], [5, 1, 0, 0], [2, 2, 4, 4]])
    mask = (tokens != 0).long()
    collector = CovarianceSink()
    captures = [ModuleCapture(0, "conv", conv, None, True), ModuleCapture(1, "emb", emb, None, False)]
    handles = attach_hooks(captures, CaptureBlock(batch_size=None, sinks=[collector], mask=mask))
    outs = [conv(images), emb(tokens)]
    for o in outs:
        o.retain_grad()
    (outs[0].pow(2).sum() + outs[1].sin().sum()).backward()
    for h in handles:
        h.remove()
    patches = F.unfold(images, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    patches = torch.cat([patches, torch.ones(len(patches), 1)], 1).double()
    torch.testing.assert_close(collector.xx["conv"], patches.T @ patches)
    g = outs[0].grad.permute(0, 2, 3, 1).reshape(-1, 3).double()
    torch.testing.assert_close(collector.gg["conv"], g.T @ g)
    counts = torch.bincount(tokens[mask.bool()], minlength=7).double()
    torch.testing.assert_close(collector.xx["emb"], counts)
    ge = (outs[1].grad * mask.unsqueeze(-1)).reshape(-1, 4).double()
    torch.testing.assert_close(collector.gg["emb"], ge.T @ ge)
    # one-hot inputs: the kept input directions are the most frequent tokens
    notes = []
    side = top_directions(collector.xx["emb"], 2, "emb", "in", notes)
    assert side.matrix.argmax(1).tolist() == [2, 3]
