"""open_store / Store: round trips, chunking, segments and ranks, errors, bounded memory."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from child_process import run_python
from store_helpers import WIDTH, make_store, rows_for

from logix.errors import StoreError
from logix.store.format import read_json, write_json_atomic
from logix.store.reader import open_store
from logix.store.writer import StoreWriter


def _write(run_dir, ids, dtype="float32", shard_rows=4096, rank=0, rows=None):
    with StoreWriter(run_dir, width=WIDTH, dtype=dtype, shard_rows=shard_rows, rank=rank) as w:
        w.add(ids, rows_for(range(len(ids))) if rows is None else rows)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shard_rows", [1, 7, 1000])
def test_round_trip(tmp_path, dtype, shard_rows):
    run_dir = make_store(tmp_path / "run", dtype=dtype)
    # ints or strings (one kind per store)
    ids = [i * 3 for i in range(23)] if shard_rows != 7 else [f"s{i}" for i in range(23)]
    _write(run_dir, ids, dtype, shard_rows)
    store = open_store(run_dir, verify="full")
    expected = rows_for(range(len(ids)))
    assert len(store) == 23 and store.data_ids == ids and store.dtype == dtype
    assert len(store.shards) == -(-23 // shard_rows)
    full = store.load()
    assert full.dtype == torch.float32 and full.shape == (23, WIDTH)
    torch.testing.assert_close(full, expected, rtol=0, atol=0)  # values are exact in all dtypes
    torch.testing.assert_close(store.load(torch.bfloat16), expected.bfloat16())
    for rows in (1, 7, 100):
        chunks = list(store.iter_chunks(rows=rows))
        assert all(len(c) == rows for c, _ in chunks[:-1]) and len(chunks[-1][0]) <= rows
        assert [i for c, _ in chunks for i in c] == ids
        torch.testing.assert_close(torch.cat([t for _, t in chunks]), full)
    for buffers in (1, 3):
        reused = [(c, t.clone()) for c, t in store.iter_chunks(rows=7, buffers=buffers)]
        torch.testing.assert_close(torch.cat([t for _, t in reused]), full)
    ring = [t for _, t in store.iter_chunks(rows=2, buffers=2)]
    assert ring[0].data_ptr() == ring[2].data_ptr() != ring[1].data_ptr()
    raw = list(store.iter_chunks(rows=5, dtype=getattr(torch, dtype)))
    assert raw[0][1].dtype == getattr(torch, dtype)
    torch.testing.assert_close(torch.cat([t for _, t in raw]).float(), full)


def test_metadata_attributes(tmp_path):
    run_dir = make_store(tmp_path / "run")
    _write(run_dir, list(range(5)), shard_rows=2)
    store = open_store(run_dir)
    assert store.path == run_dir and store.width == WIDTH and store.fingerprint == "0" * 64
    assert store.module_names == ["fc1", "fc2"] and store.modules[1].columns == slice(6, 8)
    assert store.config == {"store": {"dtype": "float32"}} and store.manifest["version"] == 1
    assert store.ranks == [0] and store.segments == ["0"] and store.segment == "0"
    assert [s["seq"] for s in store.shards] == [0, 1, 2]
    assert store.nbytes == sum((run_dir / s["file"]).stat().st_size for s in store.shards)
    assert store.curvature_dir == run_dir / "curvature" / "0"
    assert "rows=5" in repr(store)


def test_ranks_and_segments_merge(tmp_path):
    run_dir = make_store(tmp_path / "run")
    w0 = StoreWriter(run_dir, width=WIDTH, rank=0, shard_rows=3)
    w1 = StoreWriter(run_dir, width=WIDTH, rank=1, shard_rows=3)
    w0.start_segment("ep0", {"lr": 0.1})
    w1.start_segment("ep0", {"lr": 0.1})
    w1.add([100, 101, 102, 103], rows_for([100, 101, 102, 103]))
    w0.add([0, 1, 2, 3, 4], rows_for(range(5)))
    w0.start_segment("ep1", {"lr": 0.05})
    w1.start_segment("ep1")
    w0.add([0], rows_for([50]))
    w1.add([1], rows_for([51]))
    w0.close()
    w1.close()
    store = open_store(run_dir, verify="full")
    assert store.ranks == [0, 1] and store.segments == ["ep0", "ep1"]
    assert store.segment == "ep1" and store.segment_meta == {"lr": 0.05}
    assert store.data_ids == [0, 1]
    ep0 = store.select("ep0")
    assert ep0.data_ids == [0, 1, 2, 3, 4, 100, 101, 102, 103]  # rank 0 first, then rank 1
    assert [(s["rank"], s["seq"]) for s in ep0.shards] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    torch.testing.assert_close(ep0.load(), rows_for([0, 1, 2, 3, 4, 100, 101, 102, 103]))
    chunks = list(ep0.iter_chunks(rows=4))
    assert [len(c) for c, _ in chunks] == [4, 4, 1]
    with pytest.raises(StoreError, match=r"no segment 'nope'.*\['ep0', 'ep1'\]"):
        store.select("nope")


def test_empty_store(tmp_path):
    run_dir = make_store(tmp_path / "run")
    store = open_store(run_dir)
    assert len(store) == 0 and store.segments == [] and store.data_ids == []
    assert list(store.iter_chunks(rows=3)) == [] and store.load().shape == (0, WIDTH)
    StoreWriter(run_dir, width=WIDTH).close()  # an index without shards
    assert len(open_store(run_dir, verify="full")) == 0


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="not a logix store.*does not exist"):
        open_store(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no manifest.json"):
        open_store(tmp_path / "empty")
    run_dir = make_store(tmp_path / "run")
    manifest = read_json(run_dir / "manifest.json")
    write_json_atomic(run_dir / "manifest.json", {**manifest, "version": 99})
    with pytest.raises(StoreError, match="newer logix.*version 99.*upgrade logix"):
        open_store(run_dir)
    write_json_atomic(run_dir / "manifest.json", {**manifest, "format": "other"})
    with pytest.raises(StoreError, match="not a logix store manifest"):
        open_store(run_dir)
    with pytest.raises(ValueError, match="verify"):
        open_store(run_dir, verify="fast")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streaming_memory_is_bounded(tmp_path):
    """Streaming ~48 MiB in 256 KiB chunks must not grow the peak RSS like `load()` does."""
    width = 1024
    run_dir = make_store(tmp_path / "run", width=width)
    with StoreWriter(run_dir, width=width, shard_rows=1000) as w:
        for b in range(12):
            w.add(range(b * 1000, (b + 1) * 1000), torch.full((1000, width), float(b)))
    script = textwrap.dedent(f"""
        import torch
        from logix.store.reader import open_store

        def peak_growth(fn):  # reset the peak RSS (VmHWM) to the current RSS, run, measure
            open("/proc/self/clear_refs", "w").write("5")
            hwm = lambda: int([l for l in open("/proc/self/status")
                               if l.startswith("VmHWM")][0].split()[1]) // 1024
            before = hwm()
            result = fn()
            return result, hwm() - before

        store = open_store({str(run_dir)!r}, verify="full")
        total, streamed = peak_growth(
            lambda: sum(float(rows.sum()) for _, rows in store.iter_chunks(rows=64)))
        _, loaded = peak_growth(lambda: store.load())
        print(total, streamed, loaded)
    """)
    out = run_python("-c", script, text=True, check=True).stdout.split()
    assert float(out[0]) == sum(b * 1000 * width for b in range(12))
    streamed, loaded = int(out[1]), int(out[2])
    assert loaded >= 40, f"the measurement is not sensitive: load() grew RSS by {loaded} MiB"
    assert streamed < 16, f"peak RSS grew by {streamed} MiB while streaming a 48 MiB store"
