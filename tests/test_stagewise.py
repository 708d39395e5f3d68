"""SOURCE stage-wise scores: a dense float64 construction with matrix_exp, both limits, the
segment schedule (meta, logged batches, overrides) and segments that trained on other examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.query.segments import combined_scores
from logix.query.stagewise import segment_schedule, stagewise_scores

CFG = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "sum"}}
SEGMENTS = {  # name: (ids, meta)
    "s1": ([f"a{i}" for i in range(12)], {"lr": 0.1, "steps": 30, "momentum": 0.5}),
    "s2": ([f"b{i}" for i in range(8)] + ["a0", "a1", "a2", "a3"], {"lr": 0.05, "steps": 40, "examples": 20}),
    "s3": ([f"b{i}" for i in range(8)], {"lr": 0.2, "steps": 10}),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _data():
    g = torch.Generator().manual_seed(1)
    ids = [f"a{i}" for i in range(12)] + [f"b{i}" for i in range(8)]
    x = {i: 2 * torch.randn(4, generator=g) for i in ids}
    y = {i: int(torch.randint(0, 2, (1,), generator=g)) for i in ids}
    return x, y


def _queries(path, model, n: int = 3):
    g = torch.Generator().manual_seed(2)
    xq, yq = torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)
    q = logix.init(path, mode="query")
    q.watch(model)
    with q(data_id=[f"q{i}" for i in range(n)]):
        F.cross_entropy(model(xq), yq, reduction="sum").backward()
    model.zero_grad()
    return q.gradients()


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A store with three segments at three checkpoints (different examples), final queries."""
    path = tmp_path_factory.mktemp("stagewise") / "run"
    model = _model()
    x, y = _data()
    run = logix.init(path, config=CFG)
    run.watch(model)
    for name, (ids, meta) in SEGMENTS.items():
        run.start_segment(name, **meta)
        for b in range(0, len(ids), 5):
            batch = ids[b : b + 5]
            with run(data_id=batch):
                out = model(torch.stack([x[i] for i in batch]))
                F.cross_entropy(out, torch.tensor([y[i] for i in batch]), reduction="sum").backward()
        model.zero_grad()
        with torch.no_grad():  # the next checkpoint
            for p in model.parameters():
                p.add_(0.4 * torch.randn_like(p))
    run.finalize()
    return logix.open_store(path), _queries(path, model)


def _dense_source(
    store,
    q: torch.Tensor,
    names: list[str],
    horizons: dict[str, float],
    sizes: dict[str, int],
    damping: float = 0.1,
):
    """Σ_ℓ (1/N_ℓ) q S_L⋯S_{ℓ+1} r_ℓ g_ℓ with dense [D, D] block-diagonal float64 matrices."""
    d = store.width
    mats = {}
    for name in names:
        x = store.select(name).load().double()
        h = torch.zeros(d, d, dtype=torch.float64)
        for m in store.modules:
            fisher = x[:, m.columns].T @ x[:, m.columns] / x.shape[0]
            lam = damping * torch.trace(fisher) / m.width
            h[m.columns, m.columns] = fisher + lam * torch.eye(m.width, dtype=torch.float64)
        s = torch.linalg.matrix_exp(-horizons[name] * h)
        r = (torch.eye(d, dtype=torch.float64) - s) @ torch.linalg.inv(h)
        mats[name] = (s, r)
    ids = []
    for name in names:
        ids += [i for i in store.select(name).data_ids if i not in ids]
    out = torch.zeros(q.shape[0], len(ids), dtype=torch.float64)
    for k, name in enumerate(names):
        left = q.double()
        for later in reversed(names[k + 1 :]):
            left = left @ mats[later][0]
        seg = store.select(name)
        part = left @ mats[name][1] @ seg.load().double().T / sizes[name]
        for j, tid in enumerate(seg.data_ids):
            out[:, ids.index(tid)] += part[:, j]
    return out, ids


def test_source_matches_a_dense_matrix_exp_construction(staged):
    store, q = staged
    names = list(SEGMENTS)
    got = stagewise_scores(store, q, damping=0.1)
    horizons = {"s1": 0.1 / 0.5 * 30, "s2": 0.05 * 40, "s3": 0.2 * 10}
    sizes = {"s1": 12, "s2": 20, "s3": 8}  # s2's meta says 20 examples; the others count rows
    expect, ids = _dense_source(store, q.values, names, horizons, sizes)
    assert got.train_ids == ids and len(ids) == 20
    assert got.query_ids == q.data_ids
    torch.testing.assert_close(got.values.double(), expect, rtol=1e-4, atol=1e-6 * expect.abs().max())
    schedule = got.meta["schedule"]
    assert schedule["s1"]["horizon"] == pytest.approx(6.0) and schedule["s1"]["steps_from"] == "meta steps"
    assert schedule["s2"]["examples"] == 20 and schedule["s3"]["examples"] == 8
    # the propagation matters: dropping the later segments' S changes the earlier ones' scores
    alone = stagewise_scores(store, q, segments=["s1"], damping=0.1)
    assert not torch.allclose(alone.values, got.values[:, :12], rtol=1e-2)


def test_order_and_overrides(staged):
    store, q = staged
    names = ["s3", "s1"]  # any subset, in the order given
    horizons, sizes = {"s3": 0.7, "s1": 3.0}, {"s3": 5, "s1": 9}
    got = stagewise_scores(store, q, segments=names, horizons=horizons, examples=sizes, damping=0.3)
    expect, ids = _dense_source(store, q.values, names, horizons, sizes, damping=0.3)
    assert got.train_ids == ids
    torch.testing.assert_close(got.values.double(), expect, rtol=1e-4, atol=1e-6 * expect.abs().max())
    assert got.meta["schedule"]["s1"]["steps_from"] == "horizons argument"


def test_long_segment_is_damped_influence(staged):
    store, q = staged
    seg = store.select("s2")
    got = stagewise_scores(store, q, segments=["s2"], horizons={"s2": 1e12}, damping=0.2)
    influence = logix.InfluenceEngine(seg, "raw", damping=0.2).scores(q)
    assert got.train_ids == influence.train_ids
    torch.testing.assert_close(got.values * 20, influence.values, rtol=1e-4, atol=1e-6)


def test_short_segments_are_tracin(staged):
    store, q = staged
    h = {"s1": 1e-7, "s2": 3e-7, "s3": 2e-7}
    got = stagewise_scores(store, q, horizons=h)
    # no curvature acts: Σ_ℓ (η_ℓ K_ℓ / N_ℓ) qᵀ g_ℓ, i.e. TracIn-CP with the final queries
    weights = {"s1": h["s1"] / 12, "s2": h["s2"] / 20, "s3": h["s3"] / 8}
    tracin = combined_scores(
        store, {n: q for n in SEGMENTS}, preconditioner="identity", weights=weights, missing="zero"
    )
    assert got.train_ids == tracin.train_ids
    torch.testing.assert_close(
        got.values, tracin.values, rtol=1e-4, atol=1e-6 * float(tracin.values.abs().max())
    )


def test_combined_scores_need_missing_zero_for_different_examples(staged):
    store, q = staged
    with pytest.raises(logix.StoreError, match="missing='zero'"):
        combined_scores(store, {"s1": q, "s3": q}, preconditioner="identity")
    got = combined_scores(store, {"s1": q, "s3": q}, preconditioner="identity", missing="zero")
    s3 = logix.InfluenceEngine(store.select("s3"), "identity").scores(q)
    assert got.train_ids == [f"a{i}" for i in range(12)] + [f"b{i}" for i in range(8)]
    torch.testing.assert_close(got.values[:, 12:], 0.2 * s3.values)  # b* only in s3 (lr 0.2)


def test_bad_input_names_the_fix(staged, tmp_path):
    store, q = staged
    with pytest.raises(ValueError, match="horizons"):
        stagewise_scores(store, q, horizons={"nope": 1.0})
    with pytest.raises(logix.StoreError, match="no segment"):
        stagewise_scores(store, q, segments=["s1", "nope"])
    with pytest.raises(ValueError, match="damping must be > 0"):
        stagewise_scores(store, q, damping=0.0)
    with pytest.raises(ValueError, match="unknown module"):
        stagewise_scores(store, q, modules=["fc9"])
    with pytest.raises(TypeError, match="Gradients"):  # rows as a tensor are accepted, as by the engine
        stagewise_scores(store, q.values.tolist())
    with pytest.raises(ValueError, match="horizon"):
        stagewise_scores(store, q, horizons={"s1": -1.0})
    # a segment without lr or steps
    model = _model()
    run = logix.init(tmp_path / "r", config=CFG)
    run.watch(model)
    run.start_segment("nolr")
    with run(data_id=[0, 1]):
        F.cross_entropy(model(torch.randn(2, 4)), torch.tensor([0, 1]), reduction="sum").backward()
    run.finalize()
    other = logix.open_store(tmp_path / "r")
    with pytest.raises(ValueError, match="lr=..., steps="):
        segment_schedule(other)
    assert segment_schedule(other, horizon=2.0).horizon == 2.0


def test_steps_fall_back_to_the_batches_the_run_logged(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    path = tmp_path / "r"
    with logix.init(path, config=CFG) as run:
        run.watch(model)
        for epoch in range(2):
            run.start_segment(f"epoch-{epoch}", lr=0.1)
            for b in range(0, 12, 4):
                with run(data_id=list(range(b, b + 4))):
                    F.cross_entropy(model(x[b : b + 4]), y[b : b + 4], reduction="sum").backward()
                opt.step()
                opt.zero_grad()
            run.flush()  # recorded at flush and later again: counted once
    store = logix.open_store(path)
    assert store.select("epoch-0").segment_meta["logged_batches"] == 3
    schedule = segment_schedule(store.select("epoch-1"))
    assert (schedule.steps, schedule.steps_from, schedule.horizon) == (
        3.0,
        "logged batches",
        pytest.approx(0.3),
    )
    # a resumed run adds to the count of the segment it continues
    with logix.init(path, resume=True) as run:
        run.watch(model)
        with run(data_id=[100, 101]):
            F.cross_entropy(model(x[:2]), y[:2], reduction="sum").backward()
    assert logix.open_store(path).select("epoch-1").segment_meta["logged_batches"] == 4
    # meta steps win over the count
    with logix.init(tmp_path / "s", config=CFG) as run:
        run.watch(model)
        run.start_segment("stage", lr=0.5, steps=7)
        with run(data_id=[0, 1]):
            F.cross_entropy(model(x[:2]), y[:2], reduction="sum").backward()
    assert segment_schedule(logix.open_store(tmp_path / "s")).steps_from == "meta steps"
