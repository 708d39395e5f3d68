"""The mistakes of a first hour get messages that name what happened and the fix: querying a store
that was not finalized, a device this machine lacks, an id repeated within one batch; and a
query-mode block leaves the model's `.grad` as it found it (querying mid-training does not feed
query gradients into the next optimizer step)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import per_example_grads, projected_rows
from torch import nn

import logix
from logix.errors import ConfigError, StoreError

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def batch(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def log_one_batch(run, model, ids, seed=0):
    x, y = batch(len(ids), seed)
    with run(data_id=ids):
        F.cross_entropy(model(x), y).backward()
    model.zero_grad()


def finalized_store(path, model):
    with logix.init(path, config={"projection": {"kind": "identity"}}) as run:
        run.watch(model)
        log_one_batch(run, model, list(range(6)))
    return logix.open_store(path)


# -- querying before finalize ---------------------------------------------------------------
def test_querying_an_unfinalized_store_says_so(tmp_path):
    model = mlp()
    run = logix.init(tmp_path / "r", config={"projection": {"kind": "identity"}})
    try:
        run.watch(model)
        log_one_batch(run, model, list(range(6)))  # still in the writer's buffer
        with pytest.raises(StoreError, match=r"not finalized.*call `run\.finalize\(\)`"):
            logix.InfluenceEngine(logix.open_store(tmp_path / "r"))
        run.flush()  # on disk now, the rank still open: the engine works and says what it sees
        with pytest.warns(UserWarning, match=r"rank\(s\) \[0\] not finalized.*6 rows of completed shards"):
            engine = logix.InfluenceEngine(logix.open_store(tmp_path / "r"))
        assert len(engine.store) == 6
    finally:
        run.finalize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finalized: no notice
        logix.InfluenceEngine(logix.open_store(tmp_path / "r"))


def test_an_empty_finalized_segment_still_says_it_has_no_rows(tmp_path):
    model = mlp()
    with logix.init(tmp_path / "r", config={"projection": {"kind": "identity"}}) as run:
        run.watch(model)
        log_one_batch(run, model, list(range(6)))
        run.start_segment("empty")
    with pytest.raises(StoreError, match="segment 'empty' has no rows: log training data"):
        logix.InfluenceEngine(logix.open_store(tmp_path / "r", segment="empty"))


# -- the engine's device ----------------------------------------------------------------------
def test_a_device_this_machine_lacks_is_refused_when_the_engine_starts(tmp_path, monkeypatch):
    store = finalized_store(tmp_path / "r", mlp())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda', but CUDA is not available here.*device='cpu'"):
        logix.InfluenceEngine(store, device="cuda")
    with pytest.raises(ConfigError, match="is not a device"):
        logix.InfluenceEngine(store, device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"shows 1 CUDA device\(s\) \(cuda:0 to cuda:0\)"):
        logix.InfluenceEngine(store, device="cuda:3")
    monkeypatch.undo()
    assert logix.InfluenceEngine(store, device="cpu").device == torch.device("cpu")


# -- .grad after a query-mode block -----------------------------------------------------------
def test_a_query_block_restores_every_parameters_grad(tmp_path):
    model = mlp()
    finalized_store(tmp_path / "r", model)
    x, y = batch(5, seed=1)
    F.cross_entropy(model(x), y).backward()  # a training step's gradients, not yet applied
    model[2].bias.grad = None  # one parameter without a gradient
    before = {n: p.grad for n, p in model.named_parameters()}
    values = {n: None if g is None else g.clone() for n, g in before.items()}

    query = logix.init(tmp_path / "r", mode="query")
    query.watch(model)
    xq, yq = batch(3, seed=2)
    with query(data_id=["a", "b", "c"]):
        F.cross_entropy(model(xq), yq).backward()
        inside = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        assert p.grad is before[n]  # the same tensor (or None) as before the block ...
        assert (p.grad is None) == (values[n] is None)
        if p.grad is not None:
            assert torch.equal(p.grad, values[n])  # ... with the same values
    # inside the block the gradients were the query loss's alone, not added to the training ones
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(xq), yq).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(inside[n], p.grad, atol=1e-7)
    # and the captured query rows are still each query's own gradient
    grads = per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), (xq,), yq)
    expect = projected_rows(model, query.modules, query.projections, grads)
    got = query.gradients().values.double()
    assert ((got - expect).norm() / expect.norm()) < 1e-5


def test_a_failed_query_block_restores_the_grad_too(tmp_path):
    model = mlp()
    finalized_store(tmp_path / "r", model)
    x, y = batch(5, seed=1)
    F.cross_entropy(model(x), y).backward()
    before = [(p.grad, p.grad.clone()) for p in model.parameters()]
    query = logix.init(tmp_path / "r", mode="query")
    query.watch(model)
    with pytest.raises(RuntimeError, match="in the user's loop"):
        with query(data_id=[0, 1]):
            F.cross_entropy(model(x[:2]), y[:2]).backward()
            raise RuntimeError("in the user's loop")
    for p, (tensor, value) in zip(model.parameters(), before):
        assert p.grad is tensor and torch.equal(p.grad, value)


# -- duplicate ids ----------------------------------------------------------------------------
def test_an_id_repeated_within_one_batch_is_said_as_such(tmp_path):
    model = mlp()
    with logix.init(tmp_path / "r", config={"projection": {"kind": "identity"}}) as run:
        run.watch(model)
        with pytest.raises(StoreError, match=r"duplicate data id\(s\) \[7\] within this batch of 4") as e:
            log_one_batch(run, model, [7, 7, 8, 9])
        assert "resum" not in str(e.value)  # no crash-resume advice for a batch's own mistake
        log_one_batch(run, model, [7, 8, 9, 10])  # nothing of the refused batch was stored
        with pytest.raises(StoreError, match="unique within a segment.*resuming after a crash"):
            log_one_batch(run, model, [10, 11])  # across batches: the resume advice is the fix
    assert logix.open_store(tmp_path / "r").data_ids == [7, 8, 9, 10]
