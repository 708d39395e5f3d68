"""Reading global row ranges of a segment straight into tensors with `pread`, several reads in
flight and one chunk ahead of the consumer, so that a cold store streams at the disk's rate.

A chunk is split into pieces of about `PIECE_BYTES` that a small thread pool reads (`preadv`
and torch's dtype conversion release the GIL): a few requests are always queued at the disk,
where one synchronous read at a time leaves it idle between requests, and the conversion from
the storage dtype runs beside the reads instead of after them. The next chunk's pieces are
submitted before the current chunk is handed to the consumer, so its reads overlap the
consumer's work. No serialised copy: every byte is read once, into its final tensor or a small
staging buffer when the storage dtype differs.
"""

from __future__ import annotations

import bisect
import os
import queue
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from logix.errors import StoreError
from logix.store.format import SAFETENSORS_DTYPES, shard_file
from logix.store.shard_io import TORCH_DTYPES, damage_fix

PIECE_BYTES = 4 << 20  # bytes of one pread request
READ_THREADS = 4  # reads in flight


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class RowReader:
    """Reads rows of a Store's segment. `store` gives `path`, `shards` (dicts with "file"),
    `width`, `dtype`, `starts` (row index of each shard's first row, plus the total) and
    `shard_offset(i)` (file offset of row 0). Use `submit` / `wait` for reads in the background
    (`read_into` for one synchronous range) and `close()` at the end."""

    def __init__(self, store: Any, threads: int = READ_THREADS, piece_bytes: int = PIECE_BYTES):
        self.store = store
        self.storage = TORCH_DTYPES[store.dtype]
        self.row_bytes = store.width * SAFETENSORS_DTYPES[store.dtype][1]
        self.piece_rows = max(1, piece_bytes // self.row_bytes)
        self.fds: dict[int, int] = {}  # opened and closed on the caller's thread only
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="logix-read")
        self._in_flight: list[Future] = []
        self._staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()

    def _fd(self, i: int) -> int:
        if i not in self.fds:
            sh = self.store.shards[i]
            try:
                fd = os.open(shard_file(self.store.path, sh["file"]), os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                raise StoreError(f"shard {sh['file']} is missing. {damage_fix(sh['file'])}") from None
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self.fds[i] = fd
        return self.fds[i]

    def _pieces(self, start: int, k: int) -> Iterator[tuple[int, int, int, int]]:
        """(shard index, position in the request, rows, file offset) covering [start, start+k),
        each at most `piece_rows` rows and within one shard."""
        starts = self.store.starts
        pos = 0
        while pos < k:
            i = bisect.bisect_right(starts, start + pos) - 1
            local = start + pos - starts[i]
            take = min(k - pos, starts[i + 1] - starts[i] - local, self.piece_rows)
            yield i, pos, take, self.store.shard_offset(i) + local * self.row_bytes
            pos += take

    def submit(self, out: torch.Tensor, start: int) -> list[Future]:
        """Start reading rows [start, start + k) into out [k, D] (CPU, contiguous), converting
        from the storage dtype; `wait` on the returned futures before using `out`."""
        futures = [
            self._pool.submit(self._read, i, self._fd(i), out[pos : pos + take], offset)
            for i, pos, take, offset in self._pieces(start, out.shape[0])
        ]
        self._in_flight = [f for f in self._in_flight if not f.done()] + futures
        return futures

    @staticmethod
    def wait(futures: list[Future]) -> None:
        """Block until the reads are done; raise the first error (e.g. a truncated shard)."""
        for f in futures:
            f.result()

    def read_into(self, out: torch.Tensor, start: int) -> None:
        """Fill out [k, D] with rows [start, start+k) and wait for it."""
        self.wait(self.submit(out, start))

    def release_before(self, row: int) -> None:
        """Close the files of shards that end at or before `row` (no read of them is pending)."""
        for i in [i for i in self.fds if self.store.starts[i + 1] <= row]:
            os.close(self.fds.pop(i))

    def _read(self, i: int, fd: int, target: torch.Tensor, offset: int) -> None:
        """On a pool thread: one piece, straight into `target` or via a staging buffer."""
        if target.dtype == self.storage:
            self._pread(i, fd, _bytes_of(target), offset)
            return
        try:
            staging = self._staging.get_nowait()
        except queue.Empty:
            staging = torch.empty((self.piece_rows, self.store.width), dtype=self.storage)
        try:
            part = staging[: target.shape[0]]
            self._pread(i, fd, _bytes_of(part), offset)
            target.copy_(part)
        finally:
            self._staging.put(staging)

    def _pread(self, i: int, fd: int, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                rel = self.store.shards[i]["file"]
                raise StoreError(
                    f"shard {rel} ends early (truncated at byte {offset + done}). {damage_fix(rel)}"
                )
            done += n

    def close(self) -> None:
        """Wait for reads still in flight (a consumer that stopped early), then close every file."""
        wait(self._in_flight)
        self._in_flight = []
        self._pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def read_chunks(
    store: Any, rows: int, dtype: torch.dtype, buffers: int
) -> Iterator[tuple[list, torch.Tensor]]:
    """(ids, tensor [rows, D]) of `store`'s segment in row order, the next chunk read while the
    consumer holds this one (buffers=0: fresh tensors), or cycling through `buffers` tensors
    with nothing read ahead (see `Store.iter_chunks`)."""
    if rows < 1 or buffers < 0:
        raise ValueError(f"rows per chunk must be >= 1 and buffers >= 0, got {rows}, {buffers}")
    n = len(store)
    if n == 0:
        return
    ids = store.data_ids
    reader = RowReader(store)
    pool: list[torch.Tensor] = []

    def start_reading(start: int) -> tuple[torch.Tensor, list]:
        k = min(rows, n - start)
        if buffers > 0:
            slot = (start // rows) % buffers
            if len(pool) <= slot:
                pool.append(torch.empty((min(rows, n), store.width), dtype=dtype))
            out = pool[slot][:k]
        else:
            out = torch.empty((k, store.width), dtype=dtype)
        return out, reader.submit(out, start)

    try:
        ahead = start_reading(0)
        for start in range(0, n, rows):
            out, reads = ahead if ahead is not None else start_reading(start)
            reader.wait(reads)
            ahead = None
            if start + rows < n and buffers == 0:
                ahead = start_reading(start + rows)
            reader.release_before(start)
            yield ids[start : start + out.shape[0]], out
    finally:
        reader.close()
