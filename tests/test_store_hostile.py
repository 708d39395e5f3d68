"""Crafted and damaged stores (issue #19, "next in line"): every error is a StoreError naming
the file, never a raw OverflowError, RecursionError, NotADirectoryError or OSError, and no
damaged entry is accepted silently."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch
from rich.console import Console
from store_helpers import WIDTH, make_store, rows_for

import logix
from logix.commands import inspect
from logix.errors import StoreError
from logix.store.checksum import checksum_update, entry_checksum, hex32
from logix.store.format import index_path, read_json, write_json_atomic
from logix.store.shard_io import write_shard_file
from logix.store.trajectory import Trajectory
from logix.store.writer import StoreWriter

SHARD = "shards/0/r00000-000000.safetensors"
INDEX = "index/rank-00000.json"
DEEP = "[" * 100_000 + "]" * 100_000  # parses as JSON only with unbounded recursion


def _store(tmp_path):
    run_dir = make_store(tmp_path / "run")
    with StoreWriter(run_dir, width=WIDTH, shard_rows=3) as w:
        w.add(list(range(6)), rows_for(range(6)))
    return run_dir


def _edit_index(run_dir, edit) -> None:
    index = read_json(index_path(run_dir, 0))
    edit(index)
    write_json_atomic(index_path(run_dir, 0), index)


def _shard_entry(**changes):
    def edit(index):
        index["shards"][0].update(changes)

    return edit


def _rewrite_shard(run_dir, header_edit) -> None:
    """Rewrite shard 0 with an edited safetensors header, and make the index agree with the new
    file (size, crc32): a crafted store that is consistent where it is checksummed."""
    path = run_dir / SHARD
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header_edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    new = len(raw).to_bytes(8, "little") + raw + data[8 + n :]
    path.write_bytes(new)
    algorithm = entry_checksum(read_json(index_path(run_dir, 0))["shards"][0])
    crc = hex32(checksum_update(algorithm)(new, 0))
    _edit_index(run_dir, _shard_entry(bytes=len(new), crc32=crc))


def _extra_tensor(header):
    header["extra"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}  # overlaps `rows`


def _deep_ids(header):
    header["__metadata__"]["data_ids"] = DEEP


def _offset_rows(header):
    begin, end = header["rows"]["data_offsets"]
    header["rows"]["data_offsets"] = [begin + 4, end + 4]


CRAFTED = {
    # finding: name -> (how to damage the store, the file the error must name)
    "rows of 10**30": (lambda d: _edit_index(d, _shard_entry(rows=10**30)), INDEX),
    "bytes of 10**30": (lambda d: _edit_index(d, _shard_entry(bytes=10**30)), INDEX),
    "crc32 null": (lambda d: _edit_index(d, _shard_entry(crc32=None)), INDEX),
    "crc32 not hex": (lambda d: _edit_index(d, _shard_entry(crc32="zz")), INDEX),
    "next_seq -1": (lambda d: _edit_index(d, lambda i: i.update(next_seq=-1)), INDEX),
    "next_seq below a listed shard": (lambda d: _edit_index(d, lambda i: i.update(next_seq=1)), INDEX),
    "next_seq a string": (lambda d: _edit_index(d, lambda i: i.update(next_seq="2")), INDEX),
    "deeply nested index": (lambda d: (d / INDEX).write_text(DEEP), INDEX),
    "deeply nested manifest": (lambda d: (d / "manifest.json").write_text(DEEP), "manifest.json"),
    "manifest ranks damaged": (
        lambda d: write_json_atomic(d / "manifest.json", {**read_json(d / "manifest.json"), "ranks": "all"}),
        "manifest.json",
    ),
    "extra overlapping tensor in a shard": (lambda d: _rewrite_shard(d, _extra_tensor), SHARD),
    "deeply nested ids in a shard": (lambda d: _rewrite_shard(d, _deep_ids), SHARD),
    "shard rows not at the start of its data": (lambda d: _rewrite_shard(d, _offset_rows), SHARD),
}


def _read(run_dir):
    store = logix.open_store(run_dir, verify="quick")
    assert store.data_ids is not None
    store.load()


def _full(run_dir):
    logix.open_store(run_dir, verify="full")


def _resume(run_dir):
    with StoreWriter(run_dir, width=WIDTH, shard_rows=3) as w:
        w.add([100], rows_for([100]))


@pytest.mark.parametrize("action", [_read, _full, _resume], ids=["read", "full-verify", "resume"])
@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_store_errors_name_the_file(tmp_path, name, action):
    run_dir = _store(tmp_path)
    damage, file = CRAFTED[name]
    damage(run_dir)
    with pytest.raises(StoreError) as caught:
        action(run_dir)
    assert file in str(caught.value), str(caught.value)


def test_a_run_directory_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a directory")
    run_dir = tmp_path / "notes.txt" / "run"
    with pytest.raises(StoreError, match=r"notes.txt is a file"):
        logix.init(run_dir, config={"projection": {"kind": "identity"}}).watch(
            torch.nn.Sequential(torch.nn.Linear(2, 2))
        )
    with pytest.raises(StoreError, match=r"notes.txt is a file"):
        logix.open_store(run_dir)
    with pytest.raises(StoreError, match=r"notes.txt is a file"):
        StoreWriter(run_dir, width=WIDTH)


def test_deeply_nested_trajectory_index(tmp_path):
    (tmp_path / "trajectory").mkdir()
    (tmp_path / "trajectory" / "index.json").write_text(DEEP)
    with pytest.raises(StoreError, match=r"trajectory/index.json cannot be read as JSON \(nested too deeply"):
        Trajectory(tmp_path)


@pytest.mark.parametrize(
    "parameters, checkpoints",
    [
        ([{"name": "w", "dtype": "float32", "group": 0}], [{"step": 0, "crc32": "00000000"}]),  # no shape
        ([{"name": "w", "shape": [2], "dtype": "float32"}], [{"step": 0, "crc32": "00000000"}]),  # no group
        ([{"name": "w", "shape": [2], "dtype": "float32", "group": 0}], ["not a dict"]),
    ],
    ids=["no-shape", "no-group", "checkpoint-not-a-map"],
)
def test_malformed_trajectory_entries_are_store_errors(tmp_path, parameters, checkpoints):
    """A trajectory index whose entries miss a field or have the wrong shape is a StoreError naming
    the file (was a raw KeyError / AttributeError)."""
    import json

    from logix.store.trajectory import TRAJECTORY_FORMAT, TRAJECTORY_VERSION

    (tmp_path / "trajectory").mkdir()
    index = {
        "format": TRAJECTORY_FORMAT,
        "version": TRAJECTORY_VERSION,
        "optimizer": "SGD",
        "every": 1,
        "parameters": parameters,
        "checkpoints": checkpoints,
    }
    (tmp_path / "trajectory" / "index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match=r"trajectory/index.json has a malformed entry"):
        Trajectory(tmp_path)


def test_resume_on_a_read_only_store_is_a_store_error(tmp_path, monkeypatch):
    """Resuming needs write access: the first write (the writer's lock file) fails on read-only
    media with EROFS; simulated by making that open fail as a read-only mount does."""
    import errno
    import os

    run_dir = _store(tmp_path)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(StoreError, match=r"cannot be written here .*Read-only file system.*mode='query'"):
        StoreWriter(run_dir, width=WIDTH)
    monkeypatch.undo()
    assert logix.open_store(run_dir).data_ids == list(range(6))  # still readable


# -- ranks the manifest names --------------------------------------------------------------
def _two_ranks(tmp_path, rank1: str):
    """A store whose manifest names ranks 0 and 1; rank 1 wrote nothing ("never"), or its
    index was deleted with its shards left on disk ("deleted")."""
    run_dir = make_store(tmp_path / "run")
    write_json_atomic(run_dir / "manifest.json", {**read_json(run_dir / "manifest.json"), "ranks": [0, 1]})
    with StoreWriter(run_dir, width=WIDTH, shard_rows=3) as w:
        w.add(list(range(6)), rows_for(range(6)))
    if rank1 == "deleted":
        with StoreWriter(run_dir, width=WIDTH, shard_rows=3, rank=1) as w:
            w.add(list(range(6, 9)), rows_for(range(6, 9)))
        index_path(run_dir, 1).unlink()
    return run_dir


@pytest.mark.parametrize("rank1", ["never", "deleted"])
@pytest.mark.parametrize("verify", ["none", "quick", "full"])
def test_a_rank_without_its_index_is_an_error(tmp_path, rank1, verify):
    run_dir = _two_ranks(tmp_path, rank1)
    with pytest.raises(StoreError, match=r"rank\(s\) \[1\] .*index/rank-00001.json.*missing_ranks='warn'"):
        logix.open_store(run_dir, verify=verify)


def test_missing_ranks_warn_opens_the_others_and_says_so(tmp_path):
    run_dir = _two_ranks(tmp_path, "never")
    with pytest.warns(UserWarning, match=r"rank\(s\) \[1\] .*have no index"):
        store = logix.open_store(run_dir, missing_ranks="warn")
    assert store.data_ids == list(range(6))
    with pytest.raises(logix.errors.ChoiceError, match="missing_ranks"):
        logix.open_store(run_dir, missing_ranks="ignore")


def test_the_missing_rank_resumed_makes_the_store_whole(tmp_path):
    run_dir = _two_ranks(tmp_path, "never")
    with StoreWriter(run_dir, width=WIDTH, shard_rows=3, rank=1) as w:
        w.add(list(range(6, 9)), rows_for(range(6, 9)))
    assert logix.open_store(run_dir, verify="full").data_ids == list(range(9))


def test_inspect_reports_a_missing_rank(tmp_path):
    run_dir = _two_ranks(tmp_path, "never")
    parser = argparse.ArgumentParser()
    inspect.add_arguments(parser)
    console = Console(record=True, width=200, file=io.StringIO())
    code = inspect.main(parser.parse_args([str(run_dir)]), console=console)
    out = console.export_text()
    assert code == 2
    assert "rank(s) [1] are named in the manifest but have no index" in out
    assert "segments" in out  # the summary of what is there is still printed


# -- one kind of id per store ----------------------------------------------------------------
def test_mixed_id_kinds_are_refused_at_the_batch(tmp_path):
    run_dir = make_store(tmp_path / "run")
    with StoreWriter(run_dir, width=WIDTH) as w:
        with pytest.raises(StoreError, match=r"this batch mixes int and string data ids, e\.g\. 1, '2'"):
            w.add([1, "2"], rows_for([1, 2]))
        w.add([1, 2], rows_for([1, 2]))
        with pytest.raises(StoreError, match=r"the store holds int ids\), e\.g\. '1'"):
            w.add(["1"], rows_for([1]))
        w.start_segment("1")
        with pytest.raises(StoreError, match="the store holds int ids"):  # in every segment
            w.add(["3"], rows_for([3]))
    with StoreWriter(run_dir, width=WIDTH) as w:  # a resumed writer knows the store's kind
        with pytest.raises(StoreError, match="the store holds int ids"):
            w.add(["4"], rows_for([4]))
        w.add([4], rows_for([4]))
    assert logix.open_store(run_dir, segment="0").data_ids == [1, 2]
    assert logix.open_store(run_dir, segment="1").data_ids == [4]


def test_mixed_id_kinds_at_run_data_id(tmp_path):
    run = logix.init(tmp_path / "run", config={"projection": {"kind": "identity"}})
    m = torch.nn.Sequential(torch.nn.Linear(3, 2))
    run.watch(m)
    with pytest.raises(StoreError, match="mixes int and string data ids"):
        with run(data_id=[0, "1"]):
            m(torch.ones(2, 3)).sum().backward()
    run.finalize()


def test_a_crafted_store_with_mixed_id_kinds_is_refused(tmp_path):
    run_dir = _store(tmp_path)
    meta = {"format": "logix-shard", "segment": "0", "rank": "0", "data_ids": json.dumps(["a", "b"])}
    rel = "shards/0/r00000-000002.safetensors"
    size, crc = write_shard_file(run_dir / rel, "rows", rows_for([0, 1]), WIDTH, "float32", meta)
    entry = {"file": rel, "segment": "0", "seq": 2, "rows": 2, "bytes": size, "crc32": crc}
    _edit_index(run_dir, lambda i: (i["shards"].append(entry), i.update(next_seq=3)))
    with pytest.raises(StoreError, match=r"int ids in shards/0/r00000-000000.* and str ids in .*000002"):
        assert logix.open_store(run_dir).data_ids
    meta["data_ids"] = json.dumps([7, "b"])  # within one shard
    write_shard_file(run_dir / rel, "rows", rows_for([0, 1]), WIDTH, "float32", meta)
    with pytest.raises(StoreError, match=r"000002.safetensors mixes int and string data ids"):
        assert logix.open_store(run_dir, verify="none").data_ids
