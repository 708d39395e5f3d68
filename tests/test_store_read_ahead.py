"""The threaded row reader: pieces and read-ahead give exactly the rows written, errors of a
read thread reach the caller, and a consumer that stops early leaves no file or thread open."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from store_helpers import make_store

from logix.store.reader import open_store
from logix.store.row_reader import RowReader
from logix.store.writer import StoreWriter

WIDTH = 24


def _store(tmp_path, dtype="float32", shards=5, shard_rows=37):
    """A store whose rows are random (every bit matters) in `shards` shards; returns it and
    the rows as written, in the storage dtype."""
    run_dir = make_store(tmp_path / "run", width=WIDTH, dtype=dtype)
    rows = torch.randn(shards * shard_rows, WIDTH, generator=torch.Generator().manual_seed(0))
    with StoreWriter(run_dir, width=WIDTH, dtype=dtype, shard_rows=shard_rows) as w:
        w.add(list(range(len(rows))), rows)
    return open_store(run_dir, verify="full"), rows.to(getattr(torch, dtype))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("piece_bytes", [1, WIDTH * 4 * 5, 1 << 20])
def test_pieces_are_bit_identical(tmp_path, dtype, piece_bytes):
    """Pieces of one row, of a few rows (not dividing a shard) and of whole shards, read on
    several threads, converted or not, reproduce every bit; as do iter_chunks' ring buffers."""
    store, written = _store(tmp_path, dtype)
    reader = RowReader(store, threads=3, piece_bytes=piece_bytes)
    try:
        for start, k in [(0, len(store)), (30, 50), (36, 2), (len(store) - 1, 1)]:
            raw = torch.empty(k, WIDTH, dtype=written.dtype)
            reader.read_into(raw, start)
            assert torch.equal(raw.view(torch.uint8), written[start : start + k].view(torch.uint8))
            wide = torch.empty(k, WIDTH, dtype=torch.float64)
            reader.read_into(wide, start)
            assert torch.equal(wide, written[start : start + k].double())
    finally:
        reader.close()
    for buffers in (0, 1, 2, 3):
        got = [t.clone() for _, t in store.iter_chunks(rows=16, buffers=buffers)]
        assert torch.equal(torch.cat(got), written.float())


@pytest.mark.parametrize("buffers", [0, 1, 2, 3])
def test_a_chunk_stays_valid_while_its_successors_are_read(tmp_path, buffers):
    """The consumer may hold a chunk while it asks for the next max(k - 1, 0) ones (buffers=k;
    buffers=0: for ever), even when it waits for the read-ahead to land in between."""
    store, written = _store(tmp_path)
    held, pointers = [], set()
    for start, (_, chunk) in zip(range(0, len(store), 10), store.iter_chunks(rows=10, buffers=buffers)):
        threading.Event().wait(0.002)  # give any read-ahead time to land
        held = (held + [(start, chunk)])[-(buffers or len(store)) :]
        for first, old in held:
            assert torch.equal(old, written[first : first + old.shape[0]])
        pointers.add(chunk.data_ptr())
    if buffers:
        assert len(pointers) == buffers


def test_a_read_error_reaches_the_caller(tmp_path):
    """A shard truncated after open: the read thread's StoreError is raised by iter_chunks."""
    store, _ = _store(tmp_path)
    last = store.path / store.shards[-1]["file"]
    os.truncate(last, last.stat().st_size - 10)
    with pytest.raises(Exception, match="ends early") as e:
        for _ in store.iter_chunks(rows=20):
            pass
    assert type(e.value).__name__ == "StoreError"


def test_stopping_early_closes_files_and_threads(tmp_path):
    store, _ = _store(tmp_path)
    fds, threads = _open_fds(), threading.active_count()
    chunks = store.iter_chunks(rows=8)
    next(chunks)
    next(chunks)
    assert threading.active_count() > threads  # reading on its threads
    chunks.close()
    assert _open_fds() == fds and threading.active_count() == threads
    for _ in store.iter_chunks(rows=50):  # and when it runs to the end
        pass
    assert _open_fds() == fds and threading.active_count() == threads
