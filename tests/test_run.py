"""The Run API end to end: observers only, segments, modes, and bad input with the store untouched."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from reference import per_example_grads, projected_rows
from torch import nn

import logix
from logix.errors import CaptureError


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batches(n_batches=4, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        x = torch.randn(batch, 8, generator=g)
        y = torch.randint(0, 4, (batch,), generator=g)
        out.append((list(range(b * batch, (b + 1) * batch)), x, y))
    return out


def snapshot(path):
    """Every file of a store with its bytes: to show a failed call changed nothing."""
    files = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                files[os.path.relpath(p, path)] = f.read()
    return files


def train(model, data, run=None, eval_between=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    outs = []
    for ids, x, y in data:
        if run is None:
            out = model(x)
            F.cross_entropy(out, y).backward()
        else:
            with run(data_id=ids):
                out = model(x)
                F.cross_entropy(out, y).backward()
        outs.append(out.detach().clone())
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        if eval_between:
            with torch.no_grad():
                model(x)
    return outs, grads


def test_training_is_bit_identical_with_logging(tmp_path):
    data = batches(6)
    plain, logged = mlp(), mlp()
    outs_a, grads_a = train(plain, data)
    with logix.init(
        tmp_path / "r", config={"projection": {"rank_in": 4, "rank_out": 4}, "store": {"shard_rows": 5}}
    ) as run:
        run.watch(logged)
        outs_b, grads_b = train(logged, data, run, eval_between=True)
    for a, b in zip(outs_a, outs_b):
        assert torch.equal(a, b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)
    for a, b in zip(plain.parameters(), logged.parameters()):
        assert torch.equal(a, b)
    # hooks are gone after the block and after finalize
    for m in logged.modules():
        assert not m._forward_hooks
    store = logix.open_store(tmp_path / "r")
    assert len(store) == 48 and store.data_ids == list(range(48))


def test_logged_during_training_rows_match_each_steps_weights(tmp_path):
    """During real training each row is the gradient at the weights of its own step."""
    data = batches(3, batch=5)
    model, ref_model = mlp(), mlp()
    cfg = {"projection": {"kind": "identity"}, "curvature": {"statistics": []}}
    with logix.init(tmp_path / "r", config=cfg) as run:
        run.watch(model)
        train(model, data, run)
    rows = logix.open_store(tmp_path / "r").load()
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    expect = []
    for _ids, x, y in data:
        grads = per_example_grads(ref_model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), (x,), y)
        expect.append(projected_rows(ref_model, run.modules, run.projections, grads))
        F.cross_entropy(ref_model(x), y).backward()
        opt.step()
        opt.zero_grad()
    expect = torch.cat(expect)
    assert ((rows.double() - expect).norm() / expect.norm()) < 1e-5


def test_segments_keep_epochs_apart(tmp_path):
    data = batches(2)
    model = mlp()
    with logix.init(tmp_path / "r", config={"projection": {"rank_in": 4, "rank_out": 4}}) as run:
        run.watch(model)
        first = run.segment
        train(model, data, run)
        second = run.start_segment("epoch-1", lr=0.05)
        train(model, data, run)  # the same ids again: fine in a new segment
    store = logix.open_store(tmp_path / "r")
    assert store.segments == [first, second]
    assert store.segment == "epoch-1" and store.segment_meta["lr"] == 0.05
    a, b = store.select(first).load(), store.load()
    assert a.shape == b.shape == (16, store.width)
    assert not torch.equal(a, b)  # the weights changed between the epochs


def test_resume_names_the_differing_keys_and_ignores_query_defaults(tmp_path):
    cfg = {"projection": {"rank_in": 4, "rank_out": 4}}
    model = mlp()
    with logix.init(tmp_path / "r", config=cfg) as run:
        run.watch(model)
        train(model, batches(1), run)
    with pytest.raises(logix.StoreError, match=r"\(projection\.rank_in\)"):
        logix.init(tmp_path / "r", config={"projection": {"rank_in": 5, "rank_out": 4}}, resume=True)
    # Query defaults do not change what is logged: a resume with other ones is accepted, and the
    # store keeps the defaults it was created with.
    other_query = {**cfg, "query": {"damping": 1.0, "mode": "cosine"}}
    with logix.init(tmp_path / "r", config=other_query, resume=True) as run:
        assert run.config.query.damping == 0.1


def test_resume_appends_and_checks_config(tmp_path):
    data = batches(4)
    cfg = {"projection": {"rank_in": 4, "rank_out": 4}}
    model = mlp()
    with logix.init(tmp_path / "r", config=cfg) as run:
        run.watch(model)
        train(model, data[:2], run)
    with pytest.raises(logix.StoreError, match="resume=True"):
        logix.init(tmp_path / "r", config=cfg)
    with pytest.raises(logix.StoreError, match="config differs"):
        logix.init(tmp_path / "r", config={"projection": {"rank_in": 5}}, resume=True)
    with logix.init(tmp_path / "r", resume=True) as run:
        run.watch(model)
        with pytest.raises(logix.StoreError, match="duplicate"):
            train(model, data[1:2], run)
        train(model, data[2:], run)
    assert logix.open_store(tmp_path / "r").data_ids == list(range(32))
    with logix.init(tmp_path / "r", config=cfg, overwrite=True) as run:
        run.watch(model)
    assert len(logix.open_store(tmp_path / "r")) == 0


def test_attribution_only_pass_skips_weight_gradients(tmp_path):
    model = mlp()
    ids, x, y = batches(1)[0]
    with logix.init(tmp_path / "full", config={"projection": {"rank_in": 4, "rank_out": 4}}) as run:
        run.watch(model)
        with run(data_id=ids):
            F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    cfg = {"projection": {"rank_in": 4, "rank_out": 4}, "capture": {"attribution_only": True}}
    with logix.init(tmp_path / "fast", config=cfg) as run:
        run.watch(model)
        with run(data_id=ids):
            F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored after the block
    a = logix.open_store(tmp_path / "full").load()
    b = logix.open_store(tmp_path / "fast").load()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_two_backward_calls_accumulate(tmp_path):
    model = mlp()
    ids, x, y = batches(1)[0]
    cfg = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "sum"}}
    with logix.init(tmp_path / "r", config=cfg) as run:
        run.watch(model)
    q = logix.init(tmp_path / "r", mode="query")
    q.watch(model)
    with q(data_id=ids):
        F.cross_entropy(model(x), y, reduction="sum").backward()
        (0.5 * F.cross_entropy(model(x), y, reduction="sum")).backward()
    q2 = logix.init(tmp_path / "r", mode="query")
    q2.watch(model)
    with q2(data_id=ids):
        F.cross_entropy(model(x), y, reduction="sum").backward()
    torch.testing.assert_close(q.gradients().values, 1.5 * q2.gradients().values)


def test_two_runs_in_one_process_are_independent(tmp_path):
    m1, m2 = mlp(), mlp()
    ids, x, y = batches(1)[0]
    r1 = logix.init(tmp_path / "a", config={"projection": {"rank_in": 4, "rank_out": 4}})
    r2 = logix.init(tmp_path / "b", config={"projection": {"rank_in": 2, "rank_out": 2}})
    r1.watch(m1)
    r2.watch(m2)
    with r1(data_id=ids):
        F.cross_entropy(m1(x), y).backward()
    with r2(data_id=[f"s{i}" for i in ids]):
        F.cross_entropy(m2(x), y).backward()
    r1.finalize()
    r2.finalize()
    assert logix.open_store(tmp_path / "a").width == 4 * 4 + 4 * 4
    assert logix.open_store(tmp_path / "b").data_ids == [f"s{i}" for i in ids]


# -- bad input: a clear error, and the store is untouched ---------------------------------


@pytest.fixture
def logged(tmp_path):
    model = mlp()
    run = logix.init(tmp_path / "r", config={"projection": {"rank_in": 4, "rank_out": 4}})
    run.watch(model)
    train(model, batches(2), run)
    run.flush()
    yield run, model, tmp_path / "r"
    run.finalize()


def _assert_untouched(run, path, action, exc, match):
    before = snapshot(path)
    with pytest.raises(exc, match=match):
        action()
    run.flush()
    assert snapshot(path) == before


def test_id_count_must_match_batch(logged):
    run, model, path = logged
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))

    def bad():
        with run(data_id=list(range(100, 105))):
            F.cross_entropy(model(x), y).backward()

    _assert_untouched(run, path, bad, CaptureError, "batch of 8 examples but data_id has 5 ids")


def test_duplicate_ids_rejected(logged):
    run, model, path = logged
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))

    def dup_old():
        with run(data_id=list(range(3, 11))):
            F.cross_entropy(model(x), y).backward()

    def dup_within():
        with run(data_id=[100] * 8):
            F.cross_entropy(model(x), y).backward()

    _assert_untouched(run, path, dup_old, logix.StoreError, "duplicate")
    _assert_untouched(run, path, dup_within, logix.StoreError, "duplicate data id.* within this batch of 8")


def test_nan_loss_rejected(logged):
    run, model, path = logged
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))

    def nan():
        with run(data_id=list(range(100, 108))):
            (F.cross_entropy(model(x), y) * math.nan).backward()

    _assert_untouched(run, path, nan, logix.StoreError, "non-finite")


def test_backward_outside_block(logged):
    run, model, path = logged
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    before = snapshot(path)
    with pytest.raises(CaptureError, match="call loss.backward\\(\\) inside"):
        with run(data_id=list(range(100, 108))):
            loss = F.cross_entropy(model(x), y)
    with pytest.raises(CaptureError, match="after its `with run"):
        loss.backward()
    run.flush()
    assert snapshot(path) == before


def test_model_without_watched_module(tmp_path):
    run = logix.init(tmp_path / "r")
    with pytest.raises(CaptureError, match="no module of Sequential"):
        run.watch(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    assert not (tmp_path / "r").exists()


def test_store_from_a_different_model(logged, tmp_path):
    run, _, path = logged
    run.finalize()
    before = snapshot(path)
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    for mode, kwargs in (("query", {}), ("log", {"resume": True})):
        r = logix.init(path, mode=mode, **kwargs)
        with pytest.raises(
            logix.StoreError, match="does not match the store.*0.d_out is 16 in the store, 32"
        ):
            r.watch(other)
    assert snapshot(path) == before


def test_bad_yaml_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("projection:\n  kind: random\n  rnk_in: 3\n")
    with pytest.raises(
        logix.ConfigError, match="unknown key 'projection.rnk_in'; did you mean 'projection.rank_in'"
    ):
        logix.init(tmp_path / "r", config=p)
    p.write_text("store: {dtype: float64}\n")
    with pytest.raises(logix.ConfigError, match="store.dtype must be one of"):
        logix.init(tmp_path / "r", config=p)
    assert not (tmp_path / "r").exists()


def test_resolved_config_saved_and_reloadable(tmp_path):
    with logix.init(tmp_path / "r", config={"store": {"dtype": "float16"}}) as run:
        run.watch(mlp())
    cfg = logix.LogixConfig.from_yaml(tmp_path / "r" / "config.yaml")
    assert cfg.store.dtype == "float16" and cfg.projection.rank_in == 64


def test_statistics_during_logging_equal_a_streaming_pass(tmp_path):
    from logix.curvature.covariance import compute_statistics, load_statistics

    model = mlp()
    cfg = {
        "projection": {"rank_in": 4, "rank_out": 4},
        "store": {"shard_rows": 7},
        "curvature": {"during_logging": True},
    }
    with logix.init(tmp_path / "r", config=cfg) as run:
        run.watch(model)
        train(model, batches(3), run)
    store = logix.open_store(tmp_path / "r")
    logged = load_statistics(store.curvature_dir)
    streamed = compute_statistics(store, chunk_rows=5)
    assert logged.rows == streamed.rows == 24
    for m in store.modules:
        torch.testing.assert_close(logged.fisher(m.name), streamed.fisher(m.name), rtol=1e-5, atol=1e-6)
