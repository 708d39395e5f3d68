"""StoreWriter: validation, segments, ranks, background errors, observers."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import torch
from store_helpers import WIDTH, make_store, rows_for, snapshot

from logix.errors import StoreError
from logix.store.format import index_path, read_json
from logix.store.reader import open_store
from logix.store.writer import StoreWriter


@pytest.fixture
def run_dir(tmp_path):
    return make_store(tmp_path / "run")


def test_requires_manifest_and_matching_width_dtype(tmp_path, run_dir):
    with pytest.raises(StoreError, match="manifest.json does not exist"):
        StoreWriter(tmp_path / "nothing", width=WIDTH)
    with pytest.raises(StoreError, match=r"width 9, dtype float32.*width 8, dtype float32"):
        StoreWriter(run_dir, width=9)
    with pytest.raises(StoreError, match="dtype float16.*dtype float32"):
        StoreWriter(run_dir, width=WIDTH, dtype="float16")


def test_shards_are_cut_at_shard_rows(run_dir):
    with StoreWriter(run_dir, width=WIDTH, shard_rows=4) as w:
        w.add(range(3), rows_for(range(3)))
        w.add(range(3, 10), rows_for(range(3, 10)))
        assert w.segment == "0"
    index = read_json(index_path(run_dir, 0))
    assert [s["rows"] for s in index["shards"]] == [4, 4, 2]
    assert index["next_seq"] == 3
    assert [s["name"] for s in index["segments"]] == ["0"]
    store = open_store(run_dir, verify="full")
    assert store.data_ids == list(range(10))
    torch.testing.assert_close(store.load(), rows_for(range(10)))


def test_id_kinds_are_normalised(run_dir, tmp_path):
    ids = [np.int64(1), torch.tensor(2), 3]
    with StoreWriter(run_dir, width=WIDTH) as w:
        w.add(ids, torch.zeros(3, WIDTH))
        w.add(torch.tensor([6, 7]), torch.zeros(2, WIDTH))
        w.add(np.array([8]), torch.zeros(1, WIDTH))
        for bad in ([True], [1.5], [None], [torch.tensor(1.0)]):
            with pytest.raises(StoreError, match="not valid"):
                w.add(bad, torch.zeros(1, WIDTH))
        with pytest.raises(StoreError, match="single string"):
            w.add("ab", torch.zeros(2, WIDTH))
    ids_read = open_store(run_dir).data_ids
    assert ids_read == [1, 2, 3, 6, 7, 8]
    assert all(type(i) is int for i in ids_read)
    strings = make_store(tmp_path / "strings")
    with StoreWriter(strings, width=WIDTH) as w:
        w.add(["four", np.str_("five")], torch.zeros(2, WIDTH))
    assert open_store(strings).data_ids == ["four", "five"]
    assert all(type(i) is str for i in open_store(strings).data_ids)


def test_shape_and_count_errors(run_dir):
    with StoreWriter(run_dir, width=WIDTH) as w:
        with pytest.raises(StoreError, match="3 data ids for 2 rows"):
            w.add([1, 2, 3], torch.zeros(2, WIDTH))
        with pytest.raises(StoreError, match=r"\[B, 8\]"):
            w.add([1, 2], torch.zeros(2, WIDTH + 1))
        with pytest.raises(StoreError, match=r"\[B, 8\]"):
            w.add([1, 2], torch.zeros(2))
        w.add([1, 2], torch.zeros(2, WIDTH))  # the failed calls took no ids
    assert open_store(run_dir).data_ids == [1, 2]


def _dup_case(run_dir, first, second, match):
    with StoreWriter(run_dir, width=WIDTH, shard_rows=2) as w:
        w.add(first, rows_for(first))
    before = snapshot(run_dir)
    with StoreWriter(run_dir, width=WIDTH, shard_rows=2) as w:
        with pytest.raises(StoreError, match=match):
            w.add(second, rows_for(second))
    assert snapshot(run_dir) == before


def test_duplicate_within_batch(run_dir):
    _dup_case(
        run_dir, [0, 1], [5, 6, 5], r"duplicate data id\(s\) \[5\] within this batch of 3: each example"
    )


def test_duplicate_across_batches_and_reopen(run_dir):
    _dup_case(run_dir, [0, 1, 2], [7, 2], r"\[2\] in segment '0'")
    with StoreWriter(run_dir, width=WIDTH) as w:  # also within one writer, still pending
        w.add([10], rows_for([10]))
        with pytest.raises(StoreError, match=r"\[10\]"):
            w.add([10], rows_for([10]))


def test_duplicate_across_ranks(run_dir):
    with StoreWriter(run_dir, width=WIDTH, rank=0) as w:
        w.add(["a", "b"], torch.zeros(2, WIDTH))
    before = snapshot(run_dir)
    with StoreWriter(run_dir, width=WIDTH, rank=1) as w:
        assert w.segment == "0"  # continues the other rank's segment
        with pytest.raises(StoreError, match=r"\['b'\] in segment '0'"):
            w.add(["c", "b"], torch.zeros(2, WIDTH))
    after = snapshot(run_dir)
    after.pop("index/rank-00001.json")  # an empty index of the new rank is all that appeared
    assert after == before


def test_non_finite_rows_rejected(run_dir):
    rows = torch.zeros(3, WIDTH)
    rows[1, 2] = float("nan")
    rows[2, 0] = float("inf")
    with StoreWriter(run_dir, width=WIDTH) as w:
        with pytest.raises(StoreError, match=r"data id\(s\) \[11, 12\]"):
            w.add([10, 11, 12], rows)
        w.add([10], torch.ones(1, WIDTH))  # id 10 was not taken by the failed batch
    assert open_store(run_dir).data_ids == [10]


def test_segments_and_meta(run_dir):
    with StoreWriter(run_dir, width=WIDTH, shard_rows=100) as w:
        assert w.segment is None
        w.add([0, 1], rows_for([0, 1]))
        assert w.start_segment(meta={"lr": 0.1}) == "1"
        w.add([0, 1, 2], rows_for([5, 6, 7]))  # the same ids are fine in another segment
        w.update_segment_meta({"epoch": 1})
        assert w.start_segment("final", {"lr": 0.01}) == "final"
        w.add([9], rows_for([9]))
        assert w.logged_ids("1") == {0, 1, 2}
        with pytest.raises(ValueError, match="segment name"):
            w.start_segment("bad/name")
    store = open_store(run_dir)
    assert store.segments == ["0", "1", "final"]
    assert store.segment == "final" and store.segment_meta == {"lr": 0.01}
    one = store.select("1")
    assert one.segment_meta == {"lr": 0.1, "epoch": 1}
    assert one.data_ids == [0, 1, 2] and len(one) == 3
    torch.testing.assert_close(one.load(), rows_for([5, 6, 7]))
    with StoreWriter(run_dir, width=WIDTH) as w:  # reopen: continues the last own segment
        assert w.segment == "final"
        assert w.start_segment() == "2"


def test_observers_see_float32_rows_in_background(tmp_path):
    run_dir = make_store(tmp_path / "run", dtype="bfloat16")
    seen = []
    main = threading.current_thread()

    def observer(segment, rows):
        seen.append((segment, rows.dtype, rows.shape[0], threading.current_thread() is main))

    with StoreWriter(run_dir, width=WIDTH, dtype="bfloat16", shard_rows=3, observers=[observer]) as w:
        w.add(range(4), rows_for(range(4)).to(torch.float64))
    assert seen == [("0", torch.float32, 3, False), ("0", torch.float32, 1, False)]


def test_observer_error_surfaces_in_add_and_flush(run_dir):
    def boom(segment, rows):
        raise ValueError("observer exploded")

    w = StoreWriter(run_dir, width=WIDTH, shard_rows=1, observers=[boom])
    w.add([0], torch.zeros(1, WIDTH))
    with pytest.raises(StoreError, match="background writer failed.*observer exploded") as e:
        w.flush()
    assert isinstance(e.value.__cause__, ValueError)
    with pytest.raises(StoreError, match="background writer failed"):
        w.add([1], torch.zeros(1, WIDTH))  # refuses further adds
    with pytest.raises(StoreError, match="background writer failed"):
        w.close()
    w.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        w.add([2], torch.zeros(1, WIDTH))


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX permissions that apply to this user"
)
def test_read_only_shard_dir_error(run_dir):
    with StoreWriter(run_dir, width=WIDTH, shard_rows=2) as w:
        w.add([0, 1], torch.zeros(2, WIDTH))
    seg_dir = run_dir / "shards" / "0"
    seg_dir.chmod(0o500)
    try:
        w = StoreWriter(run_dir, width=WIDTH, shard_rows=2)
        w.add([2, 3], torch.zeros(2, WIDTH))
        with pytest.raises(StoreError, match="background writer failed.*Permission"):
            for i in range(100):  # the error surfaces in a later add (or the flush)
                w.add([10 + i], torch.zeros(1, WIDTH))
            w.flush()
        with pytest.raises(StoreError):
            w.close()
    finally:
        seg_dir.chmod(0o700)
    assert open_store(run_dir, verify="full").data_ids == [0, 1]


def test_float16_overflow_is_an_error_at_add_and_nothing_of_the_batch_is_stored(tmp_path):
    """Rows are converted on the caller's thread: the batch that overflows is refused by its own
    `add` (the writer goes on), not by a later one after its shard was lost."""
    run_dir = make_store(tmp_path / "run", dtype="float16")
    with StoreWriter(run_dir, width=WIDTH, dtype="float16") as w:
        w.add([0], torch.ones(1, WIDTH))
        with pytest.raises(StoreError, match=r"\[1\] overflow float16.*nothing of this batch"):
            w.add([1, 2], torch.tensor([[1e6] * WIDTH, [1.0] * WIDTH]))
        w.add([1, 2], torch.ones(2, WIDTH))  # the refused ids were not taken
    assert open_store(run_dir, verify="full").data_ids == [0, 1, 2]


def test_float16_overflow_with_observers_is_still_an_error(tmp_path):
    """A writer with observers keeps float32 buffers (its statistics are of the unrounded rows)
    and converts on its thread: the overflow surfaces at close, as before."""
    run_dir = make_store(tmp_path / "run", dtype="float16")
    seen = []
    w = StoreWriter(run_dir, width=WIDTH, dtype="float16", observers=[lambda seg, r: seen.append(r.dtype)])
    w.add([0, 1], torch.tensor([[1.0] * WIDTH, [1e6] * WIDTH]))
    with pytest.raises(StoreError, match=r"\[1\] overflow float16"):
        w.close()
    assert seen == [torch.float32]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_stores_fill_buffers_in_their_dtype_with_the_rounded_rows(tmp_path, dtype):
    """A float16 / bfloat16 store's shard buffers hold its dtype (no conversion on the writer
    thread); stored rows equal the float32 rows rounded once, whether added directly or through
    reserve()."""
    run_dir = make_store(tmp_path / "run", dtype=dtype)
    torch.manual_seed(0)
    rows = torch.randn(16, WIDTH) * 100
    with StoreWriter(run_dir, width=WIDTH, dtype=dtype, shard_rows=4) as w:
        w.add(range(5), rows[:5])
        assert w._pending.buffer.dtype == getattr(torch, dtype)
        for start in (5, 8, 11, 14):  # reserve() reuses its rows: each batch is copied out first
            n = min(3, 16 - start)
            slot = w.reserve(n)
            assert slot.dtype == torch.float32
            slot.copy_(rows[start : start + n])
            w.add(range(start, start + n), slot)
    store = open_store(run_dir, verify="full")
    assert store.data_ids == list(range(16))
    assert torch.equal(store.load(getattr(torch, dtype)), rows.to(getattr(torch, dtype)))


def test_reserved_rows_are_written_in_place_and_buffers_are_reused(run_dir):
    """reserve() hands out a slice of the shard buffer: add() then copies nothing; full shard
    buffers go back to a small pool, so a long run allocates no new buffers."""
    with StoreWriter(run_dir, width=WIDTH, shard_rows=4, queue_depth=1) as w:
        pointers = set()
        for step in range(20):
            rows = w.reserve(2)
            rows.copy_(torch.full((2, WIDTH), float(step)))
            pointers.add(w._pending.buffer.data_ptr())
            w.add([2 * step, 2 * step + 1], rows)
        assert w.buffers <= 2 and len(pointers) <= 2
        wide = w.reserve(5)  # more than a shard: a separate tensor, copied on add
        assert wide.shape == (5, WIDTH)
    store = open_store(run_dir)
    expect = torch.arange(20).repeat_interleave(2).float()[:, None].expand(40, WIDTH)
    assert torch.equal(store.load(), expect)


def test_shards_are_capped_in_bytes(run_dir):
    w = StoreWriter(run_dir, width=WIDTH, shard_rows=4096, max_shard_bytes=10 * 4 * WIDTH)
    assert w.shard_rows == 10
    w.close()


def test_disk_error_surfaces_even_as_root(run_dir):
    (run_dir / "shards").mkdir(exist_ok=True)
    (run_dir / "shards" / "blocked").write_text("a file where a segment directory should be")
    w = StoreWriter(run_dir, width=WIDTH, shard_rows=1)
    w.start_segment("blocked")
    with pytest.raises(StoreError, match="background writer failed"):
        for i in range(100):
            w.add([i], torch.zeros(1, WIDTH))
        w.flush()
    with pytest.raises(StoreError, match="background writer failed"):
        w.close()
