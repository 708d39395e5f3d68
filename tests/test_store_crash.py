"""Crash safety: SIGKILL mid-logging, orphan shards, leftover temporary files, damaged shards."""

from __future__ import annotations

import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from child_process import start_python
from store_helpers import WIDTH, make_store, rows_for

from logix.errors import StoreError
from logix.store.format import index_path, read_json, write_json_atomic
from logix.store.reader import open_store
from logix.store.writer import StoreWriter

ALL_IDS = list(range(3000))

LOGGER = """
import sys, time
from logix.store.writer import StoreWriter
from store_helpers import WIDTH, rows_for
ids = list(range(3000))
with StoreWriter(sys.argv[1], width=WIDTH, shard_rows=5) as w:
    for start in range(0, len(ids), 3):
        batch = ids[start:start + 3]
        w.add(batch, rows_for(batch))
        time.sleep(0.001)
"""


def _listed_shards(run_dir: Path) -> int:
    try:
        return len(read_json(index_path(run_dir, 0))["shards"])
    except (FileNotFoundError, StoreError):
        return 0


def _check_rows(store) -> None:
    assert len(store.data_ids) == len(set(store.data_ids))
    torch.testing.assert_close(store.load(), rows_for(store.data_ids), rtol=0, atol=0)


@pytest.mark.slow
def test_sigkill_mid_logging_then_resume(tmp_path):
    run_dir = make_store(tmp_path / "run")
    proc = start_python("-c", LOGGER, str(run_dir), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while _listed_shards(run_dir) < 20:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the logger wrote no shards in 30 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    store = open_store(run_dir, verify="full")  # every listed shard is complete
    assert 100 <= len(store) < len(ALL_IDS)
    assert set(store.data_ids) <= set(ALL_IDS)
    _check_rows(store)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a kill between rename and index update is adopted
        w = StoreWriter(run_dir, width=WIDTH, shard_rows=64)
    assert not list(run_dir.rglob("*.tmp*")), "leftover temporary files were not removed"
    remaining = [i for i in ALL_IDS if i not in w.logged_ids()]
    for start in range(0, len(remaining), 50):
        batch = remaining[start : start + 50]
        w.add(batch, rows_for(batch))
    w.close()

    store = open_store(run_dir, verify="full")
    assert sorted(store.data_ids) == ALL_IDS
    _check_rows(store)


def test_orphan_shard_is_adopted_and_tmp_files_removed(tmp_path):
    run_dir = make_store(tmp_path / "run")
    with StoreWriter(run_dir, width=WIDTH, shard_rows=4) as w:
        w.add(range(12), rows_for(range(12)))
    index = read_json(index_path(run_dir, 0))
    orphan = index["shards"].pop()  # as if killed after the rename, before the index update
    index["next_seq"] = 2
    write_json_atomic(index_path(run_dir, 0), index)
    seg_dir = run_dir / "shards" / "0"
    (seg_dir / ".r00000-000003.safetensors.tmp").write_bytes(b"half a shard")
    (seg_dir / ".r00001-000000.safetensors.tmp").write_bytes(b"another rank's, in flight")
    (run_dir / "index" / ".rank-00000.json.tmp-999").write_text("{")

    assert open_store(run_dir, verify="full").data_ids == list(range(8))  # reader ignores both
    with pytest.warns(UserWarning, match=r"adopted shards/0/r00000-000002.safetensors \(4 rows\)"):
        w = StoreWriter(run_dir, width=WIDTH, shard_rows=4)
    assert not (seg_dir / ".r00000-000003.safetensors.tmp").exists()
    assert not (run_dir / "index" / ".rank-00000.json.tmp-999").exists()
    assert (seg_dir / ".r00001-000000.safetensors.tmp").exists()  # not ours to delete
    assert read_json(index_path(run_dir, 0))["shards"][-1] == orphan
    with pytest.raises(StoreError, match=r"\[9\]"):  # the adopted ids count as logged
        w.add([9], rows_for([9]))
    w.add([12, 13], rows_for([12, 13]))
    w.close()
    store = open_store(run_dir, verify="full")
    assert store.data_ids == list(range(14))
    assert [s["seq"] for s in store.shards] == [0, 1, 2, 3]
    _check_rows(store)


def test_unreadable_orphan_is_left_alone(tmp_path):
    run_dir = make_store(tmp_path / "run")
    with StoreWriter(run_dir, width=WIDTH) as w:
        w.add([0], rows_for([0]))
    junk = run_dir / "shards" / "0" / "r00000-000007.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.warns(UserWarning, match="cannot be adopted"):
        w = StoreWriter(run_dir, width=WIDTH)
    w.add([1], rows_for([1]))
    w.close()
    assert junk.read_bytes() == b"\x00" * 3
    assert [s["seq"] for s in open_store(run_dir).shards] == [0, 8]


def test_damaged_shard_messages(tmp_path):
    run_dir = make_store(tmp_path / "run")
    with StoreWriter(run_dir, width=WIDTH, shard_rows=3) as w:
        w.add(range(9), rows_for(range(9)))
    shard = run_dir / "shards" / "0" / "r00000-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    open_store(run_dir)  # quick: sizes still match
    with pytest.raises(StoreError, match=r"r00000-000001.safetensors is corrupted: crc32") as e:
        open_store(run_dir, verify="full")
    assert "verify='none'" in str(e.value) and "Nothing was changed" in str(e.value)
    shard.write_bytes(bytes(data[:-20]))
    with pytest.raises(StoreError, match=r"r00000-000001.safetensors is truncated"):
        open_store(run_dir)
    store = open_store(run_dir, verify="none")
    with pytest.raises(StoreError, match="r00000-000001.safetensors ends early"):
        store.load()
    shard.unlink()
    with pytest.raises(StoreError, match="r00000-000001.safetensors is missing"):
        open_store(run_dir)
    with pytest.raises(StoreError, match="missing"):
        _ = open_store(run_dir, verify="none").data_ids
