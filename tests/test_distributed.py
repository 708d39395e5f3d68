"""Logging under DDP / FSDP and distributed queries, against one process on the same data.

The spawning tests start 2 gloo ranks on CPU (tests/distributed_worker.py) as subprocesses; the
reference is the same training loop run here in one process with the global batch.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from child_process import start_python
from distributed_worker import CONFIG, N_TRAIN, make_model, train
from safetensors.torch import load_file
from store_helpers import WIDTH, make_store, rows_for
from torch import nn

import logix
from logix.capture import wrappers
from logix.commands import inspect as inspect_cmd
from logix.curvature.covariance import load_statistics, read_statistics
from logix.curvature.kfac import load_factors
from logix.query import distributed as query_dist
from logix.query.results import load_result
from logix.query.topk import candidates as _candidates
from logix.query.topk import unpack as _unpack
from logix.store.format import index_path, read_json
from logix.store.gradients import Gradients
from logix.store.writer import StoreWriter

HERE = Path(__file__).parent
TIMEOUT = 240


def launch(scenario: str, out: Path, world: int = 2) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    env = {"WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    return [
        start_python(
            HERE / "distributed_worker.py",
            scenario,
            out,
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]


def wait_all(procs: list[subprocess.Popen]) -> None:
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{p.stdout.read().decode()[-3000:]}"


def rows_by_id(store) -> dict:
    return dict(zip(store.data_ids, store.load()))


# ---------------------------------------------------------------------------------- two ranks
@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The 2-rank run (DDP and FSDP logging, distributed queries) and the 1-process reference."""
    out = tmp_path_factory.mktemp("dist")
    procs = launch("log_query", out)
    single = out / "single"
    model = make_model()
    with logix.init(single, config=CONFIG) as run:
        run.watch(model)
        train(model, rank=0, world=1, run=run)
    wait_all(procs)
    return out, model


@pytest.mark.slow
def test_stores_logged_by_two_ranks_equal_one_process(logged):
    out, _ = logged
    one = logix.open_store(out / "single")
    for name in ("ddp", "fsdp", "fsdp2"):
        two = logix.open_store(out / name, verify="full")
        assert two.modules == one.modules  # 'module.' / '_fsdp_wrapped_module.' stripped
        assert two.fingerprint == one.fingerprint  # same projections: queries interchangeable
        assert two.ranks == [0, 1] and two.rank_status() == {0: "finalized", 1: "finalized"}
        assert two.manifest["ranks"] == [0, 1]
        assert sorted(two.data_ids) == sorted(one.data_ids) == list(range(N_TRAIN))
        a, b = rows_by_id(one), rows_by_id(two)
        for i in range(N_TRAIN):  # per-example rows: local output grads, mean over the local batch
            torch.testing.assert_close(b[i], a[i], rtol=0, atol=1e-6)
    stats_one = load_statistics(one.curvature_dir)
    two_dir = logix.open_store(out / "ddp").curvature_dir
    assert sorted(p.name for p in two_dir.glob("raw-r*")) == ["raw-r00000.safetensors"]  # reduced
    stats_two = load_statistics(two_dir)
    assert stats_two.rows == stats_one.rows == N_TRAIN
    recomputed, _ = read_statistics(out / "nostats" / "curvature" / "0" / "raw-stream.safetensors")
    for stats in (stats_two, recomputed):  # logged per rank, and a pass split over the ranks
        assert stats.rows == N_TRAIN
        for name, t in stats_one.tensors.items():  # float64 sums of float32 shard GEMMs
            assert float((stats.tensors[name] - t).norm() / t.norm()) < 1e-6
    # K-FAC factors: one file per rank, summed on load, equal to one process's sums.
    assert sorted(p.name for p in two_dir.glob("kfac-r*")) == [
        "kfac-r00000.safetensors",
        "kfac-r00001.safetensors",
    ]
    factors_one, factors_two = load_factors(one), load_factors(logix.open_store(out / "ddp"))
    assert factors_two.rows == factors_one.rows == N_TRAIN
    for name, t in factors_one.tensors.items():
        assert float((factors_two.tensors[name] - t).norm() / t.norm()) < 1e-6


@pytest.mark.slow
def test_coverage_under_fsdp_counts_the_original_parameters(logged):
    """FSDP v1 flattens parameters into one flat parameter per wrapper: coverage unpacks it into
    the parameters it holds (v2's DTensors keep theirs), so both read as the plain model."""
    out, model = logged
    total = sum(p.numel() for p in model.parameters())
    for kind in ("fsdp", "fsdp2"):
        for rank in (0, 1):
            cov = json.loads((out / f"coverage-{kind}-r{rank}.json").read_text())
            assert cov["captured"] == {"Linear": 2} and cov["uncovered"] == [], (kind, cov)
            assert cov["captured_parameters"] == cov["total_parameters"] == total, (kind, cov)


@pytest.mark.slow
def test_training_unchanged_by_logging_under_ddp(logged):
    out, model = logged
    assert json.loads((out / "train-equal-r0.json").read_text()) is True  # bit-identical
    assert json.loads((out / "train-equal-r1.json").read_text()) is True
    ddp = load_file(str(out / "ddp-params.safetensors"))
    for name, p in model.state_dict().items():  # DDP's mean of rank means = the global mean
        torch.testing.assert_close(ddp[name], p, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_distributed_query_equals_one_process(logged):
    out, _ = logged
    q = Gradients.load(out / "q.safetensors")
    width = logix.open_store(out / "ddp").width
    engine = logix.InfluenceEngine(out / "ddp", "raw", damping=0.1, chunk_bytes=4 * 5 * width)
    expect = {
        "top": engine.top_k(q, k=5),
        "toprel": engine.top_k(q, k=4, mode="relative"),
        "scores": engine.scores(q),
        "cos": engine.scores(q, mode="cosine", per_module=True),
        "self": engine.self_influence(),
    }
    for tag, want in expect.items():
        got = [load_result(out / f"ddp-{tag}-r{r}.safetensors") for r in (0, 1)]
        assert torch.equal(got[0].values, got[1].values)  # every rank holds the same result
        torch.testing.assert_close(got[0].values, want.values, rtol=1e-5, atol=1e-6)
        if tag.startswith("top"):
            assert torch.equal(got[0].indices, want.indices) and got[0].train_ids == want.train_ids
            assert got[0].query_ids == want.query_ids
        else:
            assert got[0].train_ids == want.train_ids
    written = load_result(out / "ddp-file.safetensors")
    assert torch.equal(written.values, load_result(out / "ddp-scores-r0.safetensors").values)
    assert written.train_ids == expect["scores"].train_ids and written.query_ids == q.data_ids
    refined = logix.InfluenceEngine(out / "ddp", "ekfac", damping=0.1, chunk_bytes=4 * 5 * width, refine=3)
    want = refined.scores(q).values
    got = [load_result(out / f"refined-scores-r{r}.safetensors").values for r in (0, 1)]
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)
    plain = logix.InfluenceEngine(out / "ddp", "ekfac", damping=0.1).scores(q).values
    assert not torch.allclose(want, plain, rtol=1e-3)  # the refinement changed the scores
    nostats = load_result(out / "nostats-top-r1.safetensors")
    assert torch.equal(nostats.indices, expect["top"].indices)
    # The store logged by one process answers the same (its rows agree to 1e-6, in another
    # order: the indices differ, the ids do not).
    single = logix.InfluenceEngine(out / "single", "raw", damping=0.1).top_k(q, k=5)
    assert single.train_ids == expect["top"].train_ids
    torch.testing.assert_close(single.values, expect["top"].values, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_duplicate_ids_across_ranks_are_an_error(tmp_path):
    wait_all(launch("duplicates", tmp_path))
    for r in (0, 1):  # finalize raised on both ranks
        message = json.loads((tmp_path / f"dup-r{r}.json").read_text())
        assert "id 3 in rank 0" in message and "drop_last=True" in message
        message = json.loads((tmp_path / f"queries-r{r}.json").read_text())
        assert "disagree on the queries" in message
    with pytest.raises(logix.StoreError, match=r"logged more than once across ranks"):
        logix.open_store(tmp_path / "dup")
    assert len(logix.open_store(tmp_path / "dup", verify="none")) == 7


@pytest.mark.slow
def test_killed_rank_keeps_completed_shards_and_is_reported(tmp_path, capsys):
    procs = launch("killed", tmp_path)
    run_dir = tmp_path / "killed"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                listed = len(read_json(index_path(run_dir, 1))["shards"])
            except (FileNotFoundError, logix.StoreError):
                listed = 0
            if listed >= 3 and (tmp_path / "rank0-logged").exists():
                break
            assert all(p.poll() is None for p in procs), procs[1].stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the ranks did not log in time"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=TIMEOUT)  # its finalize barrier fails: the peer is gone
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 0, procs[0].stdout.read().decode()[-3000:]
    message = json.loads((tmp_path / "rank0-finalize.json").read_text())
    assert "rank 0 finished logging" in message and "not every rank reached" in message

    store = logix.open_store(run_dir, verify="full")  # every listed shard, crc32-checked
    assert store.rank_status() == {0: "finalized", 1: "not finalized"}
    assert store.unfinalized_ranks == [1]
    listed = read_json(index_path(run_dir, 1))["shards"]
    assert {sh["file"] for sh in store.shards} >= {sh["file"] for sh in listed}
    ids = store.data_ids
    assert set(range(24)) <= set(ids) and len(ids) == len(set(ids))
    missing = store.missing_ids(range(N_TRAIN))
    assert missing == [i for i in range(N_TRAIN) if i not in set(ids)]
    assert missing and min(missing) >= 24 + 2 * 3  # rank 1's first three shards are there

    code = inspect_cmd.main(type("Args", (), {"run_dir": str(run_dir), "full": True})())
    text = capsys.readouterr().out
    assert code == 0 and "rank 1: not finalized" in " ".join(text.split())


# ---------------------------------------------------------------------------------- one process
def test_one_process_runs_the_distributed_code_path(tmp_path):
    from query_helpers import mlp_modules, mlp_rows, write_manifest

    run_dir = write_manifest(tmp_path / "r", mlp_modules())
    rows = mlp_rows(30, seed=1).float()
    with StoreWriter(run_dir, width=rows.shape[1], shard_rows=7) as w:
        w.add(list(range(30)), rows)
    q = mlp_rows(3, seed=2).float()
    plain = logix.InfluenceEngine(run_dir, "raw", damping=0.1, chunk_bytes=4 * 4 * rows.shape[1])
    shared = logix.InfluenceEngine(
        run_dir, "raw", damping=0.1, chunk_bytes=4 * 4 * rows.shape[1], distributed=True
    )
    assert shared._rows.row_offset == 0 and len(shared._rows) == 30
    a, b = plain.top_k(q, k=6), shared.top_k(q, k=6)
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    assert torch.equal(plain.scores(q).values, shared.scores(q).values)
    # Self-influence whitens each chunk with one GEMM; chunk shapes differ when a process streams
    # a shard view, so float32 rounding may differ in the last bits.
    torch.testing.assert_close(
        plain.self_influence().values, shared.self_influence().values, rtol=1e-6, atol=0
    )
    path = shared.save_scores(q, tmp_path / "s.safetensors", block_bytes=4 * 30 * 2)
    assert torch.equal(load_result(path).values, plain.scores(q).values)
    per_module = shared.save_scores(q, tmp_path / "m.safetensors", per_module=True)
    assert torch.equal(load_result(per_module).values, plain.scores(q, per_module=True).values)


def test_split_shards_is_contiguous_and_balanced():
    assert query_dist.split_shards([5, 5, 5, 5], 2) == [(0, 2), (2, 4)]
    assert query_dist.split_shards([10, 1, 1, 1, 1, 6], 2) == [(0, 1), (1, 6)]
    assert query_dist.split_shards([3, 3], 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]  # some ranks idle
    assert query_dist.split_shards([], 3) == [(0, 0)] * 3
    sizes = [7, 7, 7, 7, 7, 7, 2]
    parts = query_dist.split_shards(sizes, 3)
    assert parts[0][0] == 0 and parts[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    assert [sum(sizes[a:b]) for a, b in parts] == [14, 14, 16]


def test_merged_top_k_of_column_blocks_breaks_ties_like_one_process():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (5, 40), generator=g).float()  # many ties
    k = 7
    blocks = [(0, 13), (13, 13), (13, 29), (29, 40)]  # one rank holds nothing
    parts = [_candidates(scores[:, a:b], a, min(k, b - a)) for a, b in blocks if b > a]
    values, index = _unpack(query_dist.merge_keys(parts, k))
    order = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :k]
    assert np.array_equal(index.numpy(), order)
    assert torch.equal(values, torch.gather(scores, 1, index))


def test_wrapper_names_are_stripped():
    class Wrapper(nn.Module):  # what FSDP v1 / checkpoint_wrapper insert into the module tree
        def __init__(self, inner: nn.Module, attribute: str):
            super().__init__()
            self.add_module(attribute, inner)

    inner = nn.Sequential(
        OrderedDict(fc1=nn.Linear(2, 3), block=Wrapper(nn.Linear(3, 3), "_checkpoint_wrapped_module"))
    )
    wrapped = Wrapper(inner, "_fsdp_wrapped_module")
    names = [n for n, _ in wrappers.named_modules(wrapped)]
    assert names == ["", "fc1", "block"]  # the wrapper modules give way to what they wrap
    assert wrappers.named_modules(wrapped)[2][1] is inner.block._checkpoint_wrapped_module
    assert wrappers.canonical_name("a._fsdp_wrapped_module.b") == "a.b"
    assert wrappers.canonical_name("module.fc1") == "module.fc1"  # only a DDP wrapper is unwrapped
    assert wrappers.unwrap_model(nn.DataParallel(inner)) is inner


def test_rank_status_and_missing_ids(tmp_path):
    run_dir = make_store(tmp_path / "r")
    manifest = read_json(run_dir / "manifest.json")
    manifest["ranks"] = [0, 1, 2]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    done = StoreWriter(run_dir, width=WIDTH, rank=0)
    done.add([0, 1], rows_for([0, 1]))
    done.close()
    open_writer = StoreWriter(run_dir, width=WIDTH, rank=1, shard_rows=2)
    open_writer.add([2, 3, 4], rows_for([2, 3, 4]))
    open_writer.flush()  # rows on disk, writer not closed: as if the rank was killed now
    with pytest.raises(logix.StoreError, match=r"rank\(s\) \[2\] are named in the manifest"):
        logix.open_store(run_dir, verify="full")  # rank 2's rows are missing: not silently
    with pytest.warns(UserWarning, match=r"rank\(s\) \[2\] are named in the manifest"):
        store = logix.open_store(run_dir, verify="full", missing_ranks="warn")
    assert store.rank_status() == {0: "finalized", 1: "not finalized", 2: "no index"}
    assert store.unfinalized_ranks == [1, 2]
    assert store.rows_by_rank() == {0: 2, 1: 3}
    assert store.missing_ids([5, 4, 0, 9]) == [5, 9]
    assert store.missing_ids(torch.arange(3)) == []
    open_writer.close()
    with pytest.warns(UserWarning, match="have no index"):
        assert logix.open_store(run_dir, missing_ranks="warn").rank_status()[1] == "finalized"
