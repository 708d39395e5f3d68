"""K-FAC factors from the capture hooks, and the kfac / ekfac preconditioners, against dense
float64 constructions (torch.kron, explicit rotations)."""

from __future__ import annotations

import pytest
import torch
from kfac_helpers import (
    SeqNet,
    dense_scores,
    kron_fisher,
    log_model,
    make_batches,
    reference_factors,
    rel_err,
    seq_loss,
)
from query_helpers import build_store, queries

import logix
from logix.capture.factors import MAX_FACTOR_DIM
from logix.capture.projection import load_projections
from logix.curvature.kfac import factor_path, load_factors, save_factors
from logix.curvature.precondition import build_preconditioner
from logix.errors import CaptureError, StoreError
from logix.query.engine import InfluenceEngine
from logix.store.format import ModuleInfo

pytestmark = pytest.mark.usefixtures("one_thread")


def projections_of(store):
    dims = {m.name: (m.d_in, m.d_out, m.r_in, m.r_out) for m in store.modules}
    return load_projections(store.path / "projections.safetensors", dims)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A SeqNet store (random projection 3×2 incl. the bias column) with factors, mean loss."""
    torch.manual_seed(0)
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("kfac") / "run"
    log_model(path, model, batches, reduction="mean")
    return model, batches, logix.open_store(path)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_factors_equal_dense_sums(tmp_path, reduction):
    torch.manual_seed(0)
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(1))
    log_model(tmp_path / "run", model, batches, reduction=reduction)
    store = logix.open_store(tmp_path / "run")
    stats = load_factors(store)
    ref, examples = reference_factors(model, batches, projections_of(store), reduction)
    assert stats.kind == "kfac" and stats.rows == examples == len(store) == 9
    for name, (a, s, positions) in ref.items():
        assert stats.positions[name] == positions < 9 * 5  # padded positions are left out
        assert stats.tensors[f"{name}.A"].dtype == torch.float64
        assert rel_err(stats.tensors[f"{name}.A"], a) < 1e-6
        assert rel_err(stats.tensors[f"{name}.S"], s) < 1e-6
    # The file layout other statistics kinds share.
    assert factor_path(store.path, "0", 0).exists()


def test_per_rank_factor_files_are_summed(tmp_path, logged):
    _, _, store = logged
    stats = load_factors(store)
    run_dir = tmp_path / "copy"
    build_store(run_dir, list(store.modules), store.load(), statistics=False)
    for rank in (0, 3):
        save_factors(
            factor_path(run_dir, "0", rank), list(store.modules), stats.tensors, stats.positions, stats.rows
        )
    with pytest.warns(UserWarning, match="cover 18 examples"):
        total = load_factors(logix.open_store(run_dir))
    assert total.rows == 2 * stats.rows and len(total.sources) == 2
    for key, t in stats.tensors.items():
        torch.testing.assert_close(total.tensors[key], 2 * t)
    assert total.positions == {k: 2 * v for k, v in stats.positions.items()}
    # Variant kinds (e.g. true-Fisher factors) load by their kind string, separately.
    save_factors(
        factor_path(run_dir, "0", 0, kind="kfac.true"),
        list(store.modules),
        stats.tensors,
        stats.positions,
        stats.rows,
        kind="kfac.true",
    )
    variant = load_factors(logix.open_store(run_dir), "kfac.true")
    assert variant.kind == "kfac.true" and variant.rows == stats.rows == len(variant.sources) * 9
    pre = build_preconditioner(logix.open_store(run_dir), "kfac", 0.1, statistics="kfac.true")
    assert pre.statistics == "kfac.true"
    assert (run_dir / "curvature" / "0" / "eigen-kfac.true.safetensors").exists()


def test_kfac_scores_equal_dense_kron_solve(logged):
    _, _, store = logged
    x = store.load().double()
    q = x[:3] * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)[:, None] + 0.1
    stats = load_factors(store)
    fishers = {m.name: kron_fisher(stats, m.name) for m in store.modules}
    for absolute, damping in ((False, 0.1), (True, 1e-3)):
        engine = InfluenceEngine(
            store, "kfac", damping, absolute_damping=absolute, chunk_bytes=4 * 4 * store.width
        )
        ref, hinv = dense_scores(q, x, store.modules, fishers, damping, absolute)
        gq = queries(q, list(store.modules), fingerprint=store.fingerprint)
        assert rel_err(engine.scores(gq).values, ref) < 1e-5
        self_ref = torch.einsum("nd,de,ne->n", x, hinv, x)
        assert rel_err(engine.self_influence().values, self_ref) < 1e-5
        q_self = torch.einsum("nd,de,ne->n", q, hinv, q)
        cos = engine.scores(gq, mode="cosine").values
        assert rel_err(cos, ref / torch.outer(q_self.sqrt(), self_ref.sqrt())) < 1e-5
    # Relative damping is damping · mean(e_S) · mean(e_A) = damping · trace(F_kfac) / w.
    pre = build_preconditioner(store, "kfac", 0.1)
    for m in store.modules:
        assert pre.dampings[m.name] == pytest.approx(0.1 * float(torch.trace(fishers[m.name])) / m.width)


def test_ekfac_equals_dense_eigenbasis_construction(logged):
    _, _, store = logged
    x = store.load().double()
    stats = load_factors(store)
    fishers = {}
    for m in store.modules:
        _, qa = torch.linalg.eigh(stats.tensors[f"{m.name}.A"])
        _, qs = torch.linalg.eigh(stats.tensors[f"{m.name}.S"])
        basis = torch.kron(qs, qa)  # eigenvectors of kron(S, A), row-major blocks
        xm = x[:, m.columns]
        lam = ((xm @ basis) ** 2).mean(0)  # Λ = E[(Q_Sᵀ G Q_A)²], flattened the same way
        fishers[m.name] = basis @ torch.diag(lam) @ basis.T
    q = x[[0, 4]] + 0.05
    ref, _ = dense_scores(q, x, store.modules, fishers, 0.1)
    engine = InfluenceEngine(store, "ekfac", 0.1, chunk_bytes=4 * 3 * store.width)
    gq = queries(q, list(store.modules), fingerprint=store.fingerprint)
    assert rel_err(engine.scores(gq).values, ref) < 1e-5
    # EK-FAC's mean eigenvalue is trace(F_raw) / w, so its damping equals raw's.
    raw = build_preconditioner(store, "raw", 0.1)
    for name, lam in engine.preconditioner.dampings.items():
        assert lam == pytest.approx(raw.dampings[name], rel=1e-6)
    assert (store.curvature_dir / "ekfac-stream.safetensors").exists()


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def test_ekfac_equals_raw_when_fisher_is_diagonal_in_the_kronecker_basis(tmp_path):
    # Rows G_n = Q_S D_n Q_Aᵀ with one nonzero entry per D_n: F is exactly diagonal in Q_S ⊗ Q_A.
    gen = torch.Generator().manual_seed(4)
    modules = [ModuleInfo("lin", "Linear", 4, 3, 4, 3, False, 0)]
    qa, qs = random_orthogonal(4, gen), random_orthogonal(3, gen)
    n = 30
    d = torch.zeros(n, 3, 4, dtype=torch.float64)
    where = torch.randint(0, 12, (n,), generator=gen)
    d.view(n, 12)[torch.arange(n), where] = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    rows = (qs @ d @ qa.T).reshape(n, 12)
    build_store(tmp_path, modules, rows, statistics=True)
    a = qa @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ qa.T
    s = qs @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ qs.T
    save_factors(factor_path(tmp_path, "0", 0), modules, {"lin.A": a * 50, "lin.S": s * n}, {"lin": 50}, n)
    store = logix.open_store(tmp_path)
    q = queries(torch.randn(2, 12, generator=gen, dtype=torch.float64), modules)
    raw = InfluenceEngine(store, "raw", 0.1).scores(q).values
    ekfac = InfluenceEngine(store, "ekfac", 0.1).scores(q).values
    assert rel_err(ekfac, raw) < 1e-5
    kfac = InfluenceEngine(store, "kfac", 0.1).scores(q).values
    assert rel_err(kfac, raw) > 1e-2  # K-FAC's eigenvalues e_S e_Aᵀ are not those of F


def test_single_example_kfac_and_ekfac_equal_raw(tmp_path):
    # One example at one position: G = g̃ x̃ᵀ, so kron(S, A) = vec(G) vec(G)ᵀ = F exactly.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    config = {"projection": {"kind": "identity"}, "curvature": {"statistics": ["kfac"]}}
    with logix.init(tmp_path / "run", config=config) as run:
        run.watch(model)
        with run(data_id=[0]):
            model(torch.randn(1, 4)).square().sum().backward()
    store = logix.open_store(tmp_path / "run")
    q = queries(torch.randn(2, store.width, dtype=torch.float64), list(store.modules), store.fingerprint)
    raw = InfluenceEngine(store, "raw", 0.1).scores(q).values
    for kind in ("kfac", "ekfac"):
        assert rel_err(InfluenceEngine(store, kind, 0.1).scores(q).values, raw) < 1e-5


def test_wide_identity_layer_never_builds_a_full_block(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128))
    config = {"projection": {"kind": "identity"}, "curvature": {"statistics": ["kfac"]}}
    gen = torch.Generator().manual_seed(2)
    with logix.init(tmp_path / "run", config=config) as run:
        run.watch(model)
        for i in range(3):
            with run(data_id=[2 * i, 2 * i + 1]):
                model(torch.randn(2, 128, generator=gen)).pow(2).mean().backward()
    store = logix.open_store(tmp_path / "run")
    (m,) = store.modules
    assert m.width == 129 * 128 > 8192  # above the raw guard
    with pytest.raises(StoreError, match="raw curvature is for blocks of at most"):
        InfluenceEngine(store, "raw", 0.1)
    real_eigh = torch.linalg.eigh
    sizes = []
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: sizes.append(a.shape[-1]) or real_eigh(a))
    x = store.load().double()
    stats = load_factors(store)
    a = stats.tensors["0.A"] / stats.positions["0"]
    s = stats.tensors["0.S"] / stats.rows
    for kind in ("kfac", "ekfac"):
        engine = InfluenceEngine(store, kind, 0.1)
        qp = engine.preconditioner.apply(x[:2]).view(2, 128, 129)
        if kind == "kfac":
            # (S ⊗ A + λI) vec(X) = vec(S X A + λX) for the row-major [r_out, r_in] block.
            lam = engine.preconditioner.dampings["0"]
            back = s @ qp @ a + lam * qp
            assert rel_err(back.reshape(2, -1), x[:2]) < 1e-8
        scores = engine.scores(queries(x[:2], [m], store.fingerprint)).values
        assert scores.shape == (2, 6) and bool(torch.isfinite(scores).all())
    assert max(sizes) <= 129  # only the factors were ever decomposed


def test_ekfac_eigenvalues_are_cached_and_keyed(tmp_path, logged, monkeypatch):
    _, _, store = logged
    first = build_preconditioner(store, "ekfac", 0.1)
    from logix.curvature import kfac

    def fail(*a, **k):
        raise AssertionError("the cached eigenvalues must be reused")

    with monkeypatch.context() as mp:
        mp.setattr(kfac, "rotate", fail)
        again = build_preconditioner(store, "ekfac", 0.1)
    for name, block in first.blocks.items():
        torch.testing.assert_close(again.blocks[name].eigenvalues, block.eigenvalues)


def test_missing_factors_name_the_fix(tmp_path):
    torch.manual_seed(0)
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(1))
    log_model(tmp_path / "run", model, batches, statistics=("raw",))
    store = logix.open_store(tmp_path / "run")
    for kind in ("kfac", "ekfac"):
        with pytest.raises(StoreError, match=r"statistics: \[kfac\].*fit_curvature"):
            InfluenceEngine(store, kind, 0.1)


def test_fit_curvature_pass_equals_logged_factors(tmp_path, logged):
    model, batches, logged_store = logged
    reference = load_factors(logged_store)
    log_model(tmp_path / "run", model, batches, statistics=("raw",))
    before = logix.open_store(tmp_path / "run")
    rows = before.load()
    run = logix.init(tmp_path / "run", resume=True)
    run.watch(model)
    with pytest.raises(RuntimeError, match="boom"), run.fit_curvature():  # leaves nothing behind
        raise RuntimeError("boom")
    assert not factor_path(tmp_path / "run", "0", 0).exists()
    with run.fit_curvature():
        for ids, x, y, mask in batches:
            with run(data_id=ids, mask=mask):
                seq_loss(model(x), y, mask, "mean").backward()
            model.zero_grad()
    run.finalize()
    after = logix.open_store(tmp_path / "run")
    assert len(after) == len(before) and torch.equal(after.load(), rows)  # no rows written
    fitted = load_factors(after)
    assert fitted.rows == reference.rows and fitted.positions == reference.positions
    for key, t in reference.tensors.items():
        torch.testing.assert_close(fitted.tensors[key], t, rtol=1e-6, atol=1e-9)
    # A second pass replaces the factors (it does not double them).
    run = logix.init(tmp_path / "run", resume=True)
    run.watch(model)
    with run.fit_curvature(segment="0"):
        ids, x, y, mask = batches[0]
        with run(data_id=ids, mask=mask):
            seq_loss(model(x), y, mask, "mean").backward()
    run.finalize()
    with pytest.warns(UserWarning, match="cover 3 examples"):
        assert load_factors(logix.open_store(tmp_path / "run")).rows == 3
    with logix.init(tmp_path / "run", resume=True) as run:
        run.watch(model)
        with pytest.raises(CaptureError, match="does not exist"):
            run.fit_curvature(segment="nope")


def test_failed_step_adds_nothing_to_the_factors(tmp_path, logged):
    model, batches, logged_store = logged
    config = {
        "projection": {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 1},
        "curvature": {"statistics": ["kfac"]},
        "store": {"shard_rows": 4},
    }
    with logix.init(tmp_path / "run", config=config) as run:
        run.watch(model)
        for i, (ids, x, y, mask) in enumerate(batches):
            with run(data_id=ids, mask=mask):
                seq_loss(model(x), y, mask, "mean").backward()
            if i == 0:  # the same ids again: the writer refuses the batch
                with pytest.raises(StoreError, match="duplicate"), run(data_id=ids, mask=mask):
                    seq_loss(model(x), y, mask, "mean").backward()
            model.zero_grad()
    mine, theirs = load_factors(logix.open_store(tmp_path / "run")), load_factors(logged_store)
    assert mine.rows == theirs.rows and mine.positions == theirs.positions
    for key, t in theirs.tensors.items():
        torch.testing.assert_close(mine.tensors[key], t, rtol=1e-6, atol=1e-9)


def test_resumed_run_appends_to_the_segment_factors(tmp_path, logged):
    model, batches, logged_store = logged
    config = {
        "projection": {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 1},
        "curvature": {"statistics": ["kfac"]},
        "store": {"shard_rows": 4},
    }
    for part, kwargs in ((batches[:1], {"config": config}), (batches[1:], {"resume": True})):
        with logix.init(tmp_path / "run", **kwargs) as run:
            run.watch(model)
            for ids, x, y, mask in part:
                with run(data_id=ids, mask=mask):
                    seq_loss(model(x), y, mask, "mean").backward()
                model.zero_grad()
    mine, theirs = load_factors(logix.open_store(tmp_path / "run")), load_factors(logged_store)
    assert mine.rows == theirs.rows == 9
    for key, t in theirs.tensors.items():
        torch.testing.assert_close(mine.tensors[key], t, rtol=1e-6, atol=1e-9)


def test_factor_side_guard(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(MAX_FACTOR_DIM + 1, 2))
    config = {"projection": {"kind": "identity"}, "curvature": {"statistics": ["ekfac"]}}
    with pytest.raises(CaptureError, match="capture.exclude"):
        logix.init(tmp_path / "run", config=config).watch(model)
    assert not (tmp_path / "run" / "manifest.json").exists()  # refused before anything was written


def test_segments_have_their_own_factors(tmp_path, logged):
    model, batches, logged_store = logged
    config = {
        "projection": {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 1},
        "curvature": {"statistics": ["kfac"]},
        "store": {"shard_rows": 4},
    }
    with logix.init(tmp_path / "run", config=config) as run:
        run.watch(model)
        # Logging into "a" again (after "b" released its sums) continues a's factors.
        for segment, part in (("a", batches[:2]), ("b", batches[:1]), ("a", batches[2:])):
            run.start_segment(segment)
            for ids, x, y, mask in part:
                with run(data_id=ids, mask=mask):
                    seq_loss(model(x), y, mask, "mean").backward()
                model.zero_grad()
    store = logix.open_store(tmp_path / "run", segment="a")
    mine, theirs = load_factors(store), load_factors(logged_store)
    assert mine.rows == theirs.rows == len(store) == 9
    for key, t in theirs.tensors.items():
        torch.testing.assert_close(mine.tensors[key], t, rtol=1e-6, atol=1e-9)
    assert load_factors(store.select("b")).rows == 3


def test_fit_pass_replaces_every_rank_file_and_honours_discard(tmp_path):
    """A one-process fit_curvature pass over a store whose factors were logged by two ranks
    leaves one file covering the store (a stale rank file would be summed in), and a step the
    user discards (an overflowed fp16 step) or that is not finite adds nothing."""
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(0))
    path = tmp_path / "s"
    log_model(path, model, batches)
    directory = factor_path(path, "0", 0).parent
    (directory / "kfac-r00001.safetensors").write_bytes(factor_path(path, "0", 0).read_bytes())
    run = logix.init(path, resume=True)
    run.watch(model)
    with run.fit_curvature():
        for i, (ids, x, y, mask) in enumerate(batches):
            with run(data_id=ids, mask=mask) as step:
                loss = seq_loss(model(x), y, mask, "mean")
                if i == 1:
                    loss = loss * float("nan")
                    step.discard()
                loss.backward()
    run.finalize()
    assert sorted(p.name for p in directory.glob("kfac-r*")) == ["kfac-r00000.safetensors"]
    with pytest.warns(UserWarning, match="used as an estimate"):  # the discarded batch is missing
        stats = load_factors(logix.open_store(path))
    assert stats.rows == sum(len(b[0]) for i, b in enumerate(batches) if i != 1)
    assert all(bool(t.isfinite().all()) for t in stats.tensors.values())
    run = logix.init(path, resume=True)
    run.watch(model)
    with pytest.raises(CaptureError, match="non-finite K-FAC factors"):
        with run.fit_curvature():
            ids, x, y, mask = batches[0]
            with run(data_id=ids, mask=mask):
                (seq_loss(model(x), y, mask, "mean") * float("nan")).backward()
    run.finalize()


def test_per_example_row_scale_with_factors_is_refused_before_storing(tmp_path):
    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(0))
    cfg = {
        "projection": {"kind": "random", "rank_in": 3, "rank_out": 2},
        "curvature": {"statistics": ["kfac"]},
    }
    run = logix.init(tmp_path / "s", config=cfg)
    run.watch(model)
    ids, x, y, mask = batches[0]
    with pytest.raises(CaptureError, match="per-example scale_rows"):
        with run(data_id=ids, mask=mask) as step:
            seq_loss(model(x), y, mask, "mean").backward()
            step.scale_rows(torch.arange(1.0, len(ids) + 1))
    with run(data_id=ids, mask=mask):  # nothing was stored: the same ids log fine
        seq_loss(model(x), y, mask, "mean").backward()
    run.finalize()
    store = logix.open_store(tmp_path / "s")
    assert store.data_ids == list(ids) and load_factors(store).rows == len(ids)
