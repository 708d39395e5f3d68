"""True Fisher (Gauss–Newton): pseudo-gradients, the fit_curvature pass and fisher="true" queries,
each against a dense float64 Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n built from torch.func Jacobians."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from reference import projected_rows
from torch import nn
from torch.func import functional_call, jacrev, vmap

import logix
from logix.capture.fisher import fisher_logit_grads
from logix.curvature.covariance import load_statistics, read_statistics
from logix.errors import CaptureError, StoreError

PROJ = {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 0}


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- dense references
def projected_jacobian(model, modules, projections, fn, inputs) -> torch.Tensor:
    """∂(logits)/∂(projected module parameters) per example: [B, *logit_shape, D] float64."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(fn), in_dims=(None, 0))(params, inputs)  # {name: [B, *out, *param]}
    lead = next(iter(jac.values())).shape[: -len(next(iter(params.values())).shape)]
    flat = {k: v.reshape(-1, *params[k].shape) for k, v in jac.items()}
    return projected_rows(model, modules, projections, flat).reshape(*lead, -1)


def logit_covariance(logits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_{c kept} p_c (e_c − p)(e_c − p)ᵀ per position ([..., C, C]); all classes: diag p − ppᵀ."""
    p = torch.softmax(logits.double(), -1)
    e = torch.eye(p.shape[-1], dtype=torch.float64)
    diff = e - p.unsqueeze(-2)  # [..., c, C]: row c is e_c − p
    w = p if keep is None else p * keep
    return torch.einsum("...c,...ci,...cj->...ij", w, diff, diff)


def dense_fisher(jac: torch.Tensor, cov: torch.Tensor, modules, weight=None) -> dict:
    """{module: Σ J̃ᵀ Λ J̃} from J̃ [..., C, D] and Λ [..., C, C] (weighted by weight² [...])."""
    jac, cov = jac.reshape(-1, *jac.shape[-2:]), cov.reshape(-1, *cov.shape[-2:])
    if weight is not None:
        cov = cov * weight.reshape(-1, 1, 1).double() ** 2
    out = {}
    for m in modules:
        j = jac[..., m.columns]
        out[m.name] = torch.einsum("nci,ncd,ndj->ij", j, cov, j)
    return out


def top_mass_keep(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """1 at the classes of each row kept by the top-mass rule, by a plain loop: [B, C]."""
    p = torch.softmax(logits.double(), -1)
    keep = torch.zeros_like(p)
    for n in range(p.shape[0]):
        total = 0.0
        for c in sorted(range(p.shape[1]), key=lambda c: (-float(p[n, c]), c)):
            keep[n, c] = 1
            total += float(p[n, c])
            if total >= mass:
                break
    return keep


# ----------------------------------------------------------------------------- models
def classifier():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(5, 6), act=nn.Tanh(), fc2=nn.Linear(6, 4)))
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(1)) * 2
    y = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(2))
    return model.double(), x.double(), y


def logged_classifier(run_dir):
    """The classifier with its 10 examples' rows logged (sum-reduced) into an open log run:
    (model, x, y, run)."""
    model, x, y = classifier()
    run = logix.init(run_dir, config={"projection": PROJ, "capture": {"loss_reduction": "sum"}})
    run.watch(model)
    with run(data_id=list(range(10))):
        F.cross_entropy(model(x), y, reduction="sum").backward()
    return model, x, y, run


class TinyLM(nn.Module):
    """Embedding → Linear → causal running mean → tanh → Linear: logits [B, T, V]."""

    def __init__(self, vocab=7, dim=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.mix(self.emb(tokens))
        steps = torch.arange(1, tokens.shape[-1] + 1, dtype=h.dtype)
        h = torch.tanh(h.cumsum(-2) / steps.unsqueeze(-1))  # position t sees positions ≤ t only
        return self.head(h)


def sequence_batch():
    torch.manual_seed(3)
    model = TinyLM().double()
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 1, 2, 0, 0], [3, 3, 5, 1, 0]])
    pad = (torch.arange(5) < torch.tensor([[5], [3], [4]])).long()  # right padding
    labels = pad.double().clone()
    labels[:, 0] = 0  # the first position is no target
    labels[0, 2] = 0.5  # a weighted position
    return model, tokens, pad, labels


def fitted(path, model, batches, *, mass=1.0, statistics=("raw",), on_rows=None):
    """A store of `batches` [(ids, inputs, label_mask, pad_mask)] (rows logged in attribution-only
    mode, which leaves .grad alone), then a true-Fisher pass over them."""
    run = logix.init(path, config={"projection": PROJ, "capture": {"attribution_only": True}}, overwrite=True)
    run.watch(model)
    for ids, inputs, _, pad_mask in batches:
        with run(data_id=ids, mask=pad_mask):
            model(inputs).logsumexp(-1).sum().backward()
    with run.fit_curvature(fisher="true", mass=mass, statistics=statistics, on_rows=on_rows) as fit:
        for ids, inputs, label_mask, pad_mask in batches:
            with fit(data_id=ids, mask=pad_mask):
                fit.backward(model(inputs), label_mask=label_mask)
    return run, fit


def projections_of(run):
    return run.projections


# ----------------------------------------------------------------------------- pseudo-gradients
def test_logit_grads_sum_to_the_softmax_covariance():
    logits = torch.randn(3, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    grads = fisher_logit_grads(logits, mask)
    ells = list(grads)
    assert len(ells) == len(grads) == 5 * 6 and all(e.shape == logits.shape for e in ells)
    got = sum(torch.einsum("bti,btj->btij", e, e) for e in ells)
    want = logit_covariance(logits) * mask[..., None, None]
    torch.testing.assert_close(got, want)
    assert grads.positions == 12 and float(grads.dropped_mass.abs().max()) == 0.0


def test_top_mass_drops_exactly_the_smallest_classes():
    logits = torch.randn(6, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    grads = fisher_logit_grads(logits, mass=0.8)
    keep = top_mass_keep(logits, 0.8)
    got = sum(torch.einsum("bi,bj->bij", e, e) for e in grads)
    torch.testing.assert_close(got, logit_covariance(logits, keep))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(grads.dropped_mass[:, 0], 1 - (p * keep).sum(-1))
    assert len(grads) == int(keep.sum(1).max()) < 7
    assert bool((grads.dropped_trace > grads.dropped_mass).all())  # mass understates the loss
    full = fisher_logit_grads(logits, mass=1.0)
    assert len(full) == 7 and float(full.dropped_trace.max()) == 0.0


def test_logit_grads_reject_bad_input():
    with pytest.raises(ValueError, match="mass must be in"):
        fisher_logit_grads(torch.zeros(2, 3), mass=0)
    with pytest.raises(ValueError, match="mask must have the shape"):
        fisher_logit_grads(torch.zeros(2, 4, 3), torch.ones(2, 3))


# ----------------------------------------------------------------------------- the pass
def classifier_batches(x, ids=None):
    ids = list(range(len(x))) if ids is None else ids
    return [(ids[:4], x[:4], None, None), (ids[4:], x[4:], None, None)]


def test_classification_statistic_equals_dense_gauss_newton(tmp_path):
    model, x, _ = classifier()
    run, fit = fitted(tmp_path / "r", model, classifier_batches(x))  # loss_reduction mean: no 1/B
    run.finalize()
    stats = load_statistics(tmp_path / "r" / "curvature" / "0", "raw.true")
    assert stats.kind == "raw.true" and stats.rows == 10 == fit.examples
    assert fit.passes == 2 * 4 and fit.pseudo_rows == 10 * 4

    def fn(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = projected_jacobian(model, run.modules, projections_of(run), fn, x)  # [10, 4, D]
    want = dense_fisher(jac, logit_covariance(model(x).detach()), run.modules)
    for name, ref in want.items():
        assert rel_err(stats.tensors[name], ref) < 1e-5, name
    _, md = read_statistics(stats.sources[0])
    assert md["fisher"] == "true" and md["mass"] == "1.0" and md["pseudo_rows"] == "40"


def test_top_mass_pass_equals_dense_partial_sum(tmp_path):
    model, x, _ = classifier()
    run, fit = fitted(tmp_path / "r", model, classifier_batches(x), mass=0.6)
    run.finalize()
    stats = load_statistics(tmp_path / "r" / "curvature" / "0", "raw.true")

    def fn(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    logits = model(x).detach()
    keep = top_mass_keep(logits, 0.6)
    assert 10 < keep.sum() < 40  # some classes dropped, not all
    jac = projected_jacobian(model, run.modules, projections_of(run), fn, x)
    want = dense_fisher(jac, logit_covariance(logits, keep), run.modules)
    for name, ref in want.items():
        assert rel_err(stats.tensors[name], ref) < 1e-5, name
    p = torch.softmax(logits.double(), -1)
    assert fit.dropped_mass == pytest.approx(float((1 - (p * keep).sum(1)).mean()))
    assert fit.pseudo_rows == int(keep.sum())


def test_sequence_statistic_equals_dense_per_position_sum(tmp_path):
    model, tokens, pad, labels = sequence_batch()
    batches = [([0, 1], tokens[:2], labels[:2], pad[:2]), ([2], tokens[2:], labels[2:], pad[2:])]
    run, fit = fitted(tmp_path / "r", model, batches)
    run.finalize()
    stats = load_statistics(tmp_path / "r" / "curvature" / "0", "raw.true")
    assert stats.rows == 3 and fit.positions == int((labels != 0).sum())
    assert fit.passes == 7 * (4 + 3)  # V passes per position holding a target: 1..4, then 1..3

    def fn(p, tok):
        return functional_call(model, p, (tok.unsqueeze(0),)).squeeze(0)  # [T, V]

    jac = projected_jacobian(model, run.modules, projections_of(run), fn, tokens)  # [B, T, V, D]
    want = dense_fisher(jac, logit_covariance(model(tokens).detach()), run.modules, weight=labels)
    assert [m.type for m in run.modules] == ["Embedding", "Linear", "Linear"]
    for name, ref in want.items():
        assert rel_err(stats.tensors[name], ref) < 1e-5, name


def test_pass_is_deterministic_and_leaves_the_model_untouched(tmp_path):
    model, x, y = classifier()
    model.fc1.bias.requires_grad_(False)  # a frozen parameter stays frozen
    F.cross_entropy(model(x), y).backward()
    before = {
        k: (p.detach().clone(), None if p.grad is None else p.grad.clone(), p.requires_grad)
        for k, p in model.named_parameters()
    }
    sums = []
    for i in range(2):
        run, _ = fitted(tmp_path / f"r{i}", model, classifier_batches(x))
        run.finalize()
        sums.append(load_statistics(tmp_path / f"r{i}" / "curvature" / "0", "raw.true"))
    for name in sums[0].tensors:
        assert torch.equal(sums[0].tensors[name], sums[1].tensors[name])
    for k, p in model.named_parameters():
        value, grad, flag = before[k]
        assert torch.equal(p, value) and p.requires_grad == flag
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad), k


def test_true_fisher_scores_equal_a_dense_solve(tmp_path):
    model, x, y, run = logged_classifier(tmp_path / "r")
    with run.fit_curvature(fisher="true") as fit:
        for ids, inputs, _, _ in classifier_batches(x[:8]):  # a subset of the data is allowed
            with fit(data_id=ids):
                fit.backward(model(inputs))
    run.finalize()
    xq = torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    q = logix.init(tmp_path / "r", mode="query")
    q.watch(model)
    with q(data_id=["a", "b", "c"]):
        F.cross_entropy(model(xq), torch.tensor([0, 1, 2]), reduction="sum").backward()
    queries = q.gradients()
    store = logix.open_store(tmp_path / "r")
    scores = logix.InfluenceEngine(store, "raw", damping=0.1, fisher="true").scores(queries)

    def fn(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = projected_jacobian(model, run.modules, projections_of(run), fn, x[:8])
    fisher = dense_fisher(jac, logit_covariance(model(x[:8]).detach()), run.modules)
    rows, qv = store.load().double(), queries.values.double()
    want = torch.zeros(3, 10, dtype=torch.float64)
    for m in run.modules:
        f = fisher[m.name] / 8
        lam = 0.1 * float(torch.trace(f)) / m.width
        want += qv[:, m.columns] @ torch.linalg.solve(
            f + lam * torch.eye(m.width, dtype=torch.float64), rows[:, m.columns].T
        )
    assert rel_err(scores.values, want) < 1e-4
    assert scores.meta["fisher"] == "true"
    assert (store.curvature_dir / "eigen-raw.true.safetensors").exists()
    empirical = logix.InfluenceEngine(store, "raw", damping=0.1, fisher="empirical").scores(queries)
    assert rel_err(empirical.values, want) > 1e-2  # the two Fishers differ
    from logix.cli import build_parser
    from logix.commands import query as query_command

    queries.save(tmp_path / "q.safetensors")
    args = build_parser().parse_args(
        ["query", str(tmp_path / "r"), "--queries", str(tmp_path / "q.safetensors"), "--fisher", "true"]
    )
    assert query_command.main(args, console=_quiet()) == 0


def _quiet():
    from rich.console import Console

    return Console(record=True, width=120, file=open("/dev/null", "w"))


def test_on_rows_sees_the_pseudo_gradients(tmp_path):
    model, x, _ = classifier()
    seen, owners = [], []

    def collect(ids, rows):
        owners.extend(ids)
        seen.append(rows)

    run, fit = fitted(
        tmp_path / "r",
        model,
        classifier_batches(x, ids=[f"x{i}" for i in range(10)]),
        statistics=(),
        on_rows=collect,
    )
    run.finalize()
    rows = torch.cat(seen).double()
    assert rows.shape == (40, run.width) and fit.paths == []
    assert owners == [f"x{i}" for i in range(4)] * 4 + [f"x{i}" for i in range(4, 10)] * 4
    fitted(tmp_path / "s", model, classifier_batches(x))[0].finalize()
    stats = load_statistics(tmp_path / "s" / "curvature" / "0", "raw.true")
    m = run.modules[1]
    assert rel_err(stats.tensors[m.name], rows[:, m.columns].T @ rows[:, m.columns]) < 1e-6


def test_missing_true_statistics_name_the_pass(tmp_path):
    model, x, y = classifier()
    with logix.init(tmp_path / "r", config={"projection": PROJ}) as run:
        run.watch(model)
        with run(data_id=list(range(10))):
            F.cross_entropy(model(x), y).backward()
    with pytest.raises(StoreError, match=r'run.fit_curvature\(fisher="true", statistics=\[.raw.\]\)'):
        logix.InfluenceEngine(tmp_path / "r", fisher="true")
    with pytest.raises(ValueError, match="did you mean 'true'"):
        logix.InfluenceEngine(tmp_path / "r", fisher="ture")


def test_pass_errors_name_the_fix(tmp_path):
    model, x, _ = classifier()
    run = logix.init(tmp_path / "r", config={"projection": PROJ})
    run.watch(model)
    with pytest.raises(CaptureError, match="no segment yet"):
        run.fit_curvature(fisher="true")
    with run(data_id=list(range(10))):
        F.cross_entropy(model(x), torch.zeros(10, dtype=torch.long)).backward()
    with pytest.raises(ValueError, match="fisher must be"):
        run.fit_curvature(fisher="ture")
    with pytest.raises(ValueError, match="options of fisher='true'"):
        run.fit_curvature(mass=0.5)
    with pytest.raises(ValueError, match="unknown true-Fisher statistics"):
        run.fit_curvature(fisher="true", statistics=["rwa"])
    with pytest.raises(CaptureError, match="no batch"):
        with run.fit_curvature(fisher="true"):
            pass
    with run.fit_curvature(fisher="true") as fit:
        with pytest.raises(CaptureError, match="inside a `with fit"):
            fit.backward(model(x))
        logits = model(x)
        with pytest.raises(CaptureError, match="no watched module"):
            with fit(data_id=list(range(10))):
                fit.backward(logits)  # computed outside the block
        with fit(data_id=list(range(10))):
            with pytest.raises(CaptureError, match="cannot be nested"):
                with run(data_id=list(range(10))):
                    pass
            fit.backward(model(x))
        with pytest.raises(CaptureError, match="already seen"):
            with fit(data_id=[3]):
                fit.backward(model(x[3:4]))
    run.finalize()
    query = logix.init(tmp_path / "r", mode="query")
    query.watch(model)
    with pytest.raises(CaptureError, match="resume=True"):
        query.fit_curvature(fisher="true")
    pca = logix.init(tmp_path / "p", config={"projection": {"kind": "pca"}})
    pca.watch(model)
    with pytest.raises(CaptureError, match="fit_projections"):
        pca.fit_curvature(fisher="true")


def test_resumed_store_gets_true_statistics_for_a_chosen_segment(tmp_path):
    model, x, y = classifier()
    with logix.init(tmp_path / "r", config={"projection": PROJ}) as run:
        run.watch(model)
        for seg in ("a", "b"):
            run.start_segment(seg)
            with run(data_id=list(range(10))):
                F.cross_entropy(model(x), y).backward()
    run = logix.init(tmp_path / "r", resume=True)
    run.watch(model)
    with pytest.raises(CaptureError, match="segment 'c' does not exist"):
        run.fit_curvature("c", fisher="true")
    with run.fit_curvature("a", fisher="true") as fit:
        with fit(data_id=list(range(10))):
            fit.backward(model(x))
    run.finalize()
    store = logix.open_store(tmp_path / "r", segment="a")
    assert logix.InfluenceEngine(store, fisher="true").preconditioner.statistics == "raw.true"
    with pytest.raises(StoreError, match="no true-Fisher"):
        logix.InfluenceEngine(store.select("b"), fisher="true")


def test_activation_checkpointing_in_the_true_fisher_pass(tmp_path):
    """Non-reentrant checkpointing gives the statistics of the plain model; reentrant
    checkpointing (which torch.autograd.grad cannot go through) is a clear error."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.fc0, self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 3)
            self.mode = mode

        def forward(self, x):
            h = self.fc0(x)
            block = lambda z: torch.tanh(self.fc1(z))  # noqa: E731
            h = block(h) if self.mode is None else checkpoint(block, h, use_reentrant=self.mode)
            return self.fc2(h)

    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    state = Net(None).state_dict()
    traces = {}
    for name, mode in (("plain", None), ("non-reentrant", False), ("reentrant", True)):
        model = Net(mode)
        model.load_state_dict(state)
        with logix.init(tmp_path / name, config={"projection": {"kind": "identity"}}) as run:
            run.watch(model)
            with run(data_id=list(range(5))):
                F.cross_entropy(model(x), y).backward()
            if mode is True:
                with pytest.raises(CaptureError, match="use_reentrant=False"):
                    with run.fit_curvature(fisher="true") as fit:
                        with fit(data_id=list(range(5))):
                            fit.backward(model(x))
                continue
            with run.fit_curvature(fisher="true") as fit:
                with fit(data_id=list(range(5))):
                    fit.backward(model(x))
        stats = load_statistics(tmp_path / name / "curvature" / "0", "raw.true")
        traces[name] = stats.tensors["fc1"]
    torch.testing.assert_close(traces["non-reentrant"], traces["plain"], rtol=1e-6, atol=1e-9)
