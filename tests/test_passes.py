"""One pass protocol and one capture path: every statistics pass is a `StatisticsPass` used as
`with fit(data_id=ids):`, the old spelling `with run(data_id=ids):` gives the same sums, and a
new statistic is a sink fed by the same hooks (checked against hand-computed references)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kfac_helpers import SeqNet, log_model, make_batches, reference_factors, rel_err, seq_loss

import logix
from logix.capture.hooks import CaptureBlock, Sink, attach_hooks
from logix.curvature.kfac import load_factors
from logix.errors import CaptureError
from logix.run import Block, StatisticsPass

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit_factors(path, model, batches, spelling: str):
    run = logix.init(path, resume=True)
    run.watch(model)
    with run.fit_curvature() as fit:
        assert isinstance(fit, StatisticsPass)
        for ids, x, y, mask in batches:
            block = fit(data_id=ids, mask=mask) if spelling == "fit" else run(data_id=ids, mask=mask)
            with block as b:
                assert isinstance(b, Block) and run.active_block is b
                seq_loss(model(x), y, mask, "mean").backward()
            model.zero_grad()
    run.finalize()
    return load_factors(logix.open_store(path))


def test_both_spellings_of_the_empirical_pass_give_the_dense_factors(tmp_path):
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(0))
    got = {}
    for spelling in ("fit", "run"):
        log_model(tmp_path / spelling, model, batches, statistics=("raw",))
        got[spelling] = _fit_factors(tmp_path / spelling, model, batches, spelling)
    assert torch.equal(got["fit"].tensors["fc1.A"], got["run"].tensors["fc1.A"])
    query = logix.init(tmp_path / "fit", mode="query")
    query.watch(model)
    want, examples = reference_factors(model, batches, query.projections)
    assert got["fit"].rows == examples
    for name, (a, s, positions) in want.items():
        assert rel_err(got["fit"].tensors[f"{name}.A"], a) < 1e-5
        assert rel_err(got["fit"].tensors[f"{name}.S"], s) < 1e-5
        assert got["fit"].positions[name] == positions


def test_both_spellings_of_the_pca_pass_give_the_same_projections(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    x, y = torch.randn(3, 7, 6), torch.randint(0, 5, (3, 7))
    projections = []
    for spelling in ("fit", "run"):
        run = logix.init(
            tmp_path / spelling, config={"projection": {"kind": "pca", "rank_in": 3, "rank_out": 2}}
        )
        run.watch(model)
        with run.fit_projections() as fit:
            assert isinstance(fit, StatisticsPass)
            for b in range(3):
                ids = list(range(7 * b, 7 * b + 7))
                with fit(data_id=ids) if spelling == "fit" else run(data_id=ids):
                    F.cross_entropy(model(x[b]), y[b]).backward()
        projections.append(run.projections)
        run.finalize()
    for name in projections[0]:
        assert torch.equal(projections[0][name].p_in.matrix, projections[1][name].p_in.matrix)
        assert torch.equal(projections[0][name].p_out.matrix, projections[1][name].p_out.matrix)


def test_protocol_errors_name_the_fix(tmp_path):
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(0))
    log_model(tmp_path / "s", model, batches, statistics=("raw",))
    run = logix.init(tmp_path / "s", resume=True)
    run.watch(model)
    ids, x, y, mask = batches[0]
    fit = run.fit_curvature()
    with pytest.raises(CaptureError, match=r"with run.fit_curvature\(\) as fit"):
        fit(data_id=ids)
    with fit:
        with pytest.raises(CaptureError, match="call loss.backward"):
            with fit(data_id=ids, mask=mask):
                fit.backward(model(x))
        with pytest.raises(CaptureError, match="cannot be nested"):
            with run.fit_curvature():
                pass
    true = run.fit_curvature(fisher="true")
    with true:
        with pytest.raises(CaptureError, match=r"fit.backward\(model\(x\)\)"):
            with run(data_id=ids, mask=mask):
                pass
        with true(data_id=ids) as block:
            block.backward(model(x), label_mask=mask)
    assert true.examples == len(ids)
    run.finalize()


class _InputSums(Sink):
    """A new statistic as a sink: Σ over positions of x̃ per module, and the raw inputs' sums."""

    def __init__(self):
        self.projected_sums: dict[str, torch.Tensor] = {}
        self.raw_sums: dict[str, torch.Tensor] = {}

    def forward(self, capture, block, x):
        self.raw_sums[capture.name] = x.double().sum(0)

    def backward(self, capture, block, call, g_proj, grad):
        self.projected_sums[capture.name] = call.x_proj.sum(dim=(0, 1))


def test_a_new_statistic_is_a_new_sink(tmp_path):
    """The hooks hand a custom sink x̃ = P_in [x, 1] (mask and 1/B undone) and the raw input."""
    torch.manual_seed(1)
    model = SeqNet()
    run = logix.init(tmp_path / "r", config={"projection": {"kind": "random", "rank_in": 3, "rank_out": 2}})
    run.watch(model)
    x = torch.randn(4, 5, 5)
    mask = torch.ones(4, 5)
    mask[0, 3:] = 0
    sink = _InputSums()
    block = CaptureBlock(batch_size=4, sinks=[sink], grad_scale=4.0, mask=mask)
    handles = attach_hooks(run.captures(), block)
    model(x).sum().backward()
    for h in handles:
        h.remove()
    assert block.reached == {0, 1}
    p = run.projections["fc1"].p_in.matrix.double()
    xin = torch.cat([x, torch.ones(4, 5, 1)], -1).double() * mask[..., None].double() * 4.0
    want = (xin @ p.T).sum(dim=(0, 1))
    assert rel_err(sink.projected_sums["fc1"].double(), want) < 1e-6
    assert torch.equal(sink.raw_sums["fc1"], x.double().sum(0))
    run.finalize()


def test_step_alias_is_gone():
    import logix.run as run_module

    with pytest.raises(AttributeError, match="Step"):
        run_module.Step  # noqa: B018 - the removed alias of Block
    assert run_module.Block is Block
