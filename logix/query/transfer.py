"""Streaming a store's rows onto the engine's device, a bounded number of bytes at a time.

A reader thread reads chunk i+1 (into one of three reused host buffers) while chunk i is
scored. On CUDA the host chunks are then copied through two pinned buffers on a side stream,
so the copy of chunk i+1 overlaps the scoring of chunk i, and rows are upcast to float32 on the
device (half the bytes cross the bus for bf16 / fp16 stores). On CPU rows are read as float32.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import torch

from logix.errors import StoreError
from logix.store.reader import TORCH_DTYPES

T = TypeVar("T")
DEFAULT_CHUNK_BYTES = 64 << 20  # per float32 chunk: 4096 rows of a 4096-wide store


def rows_per_chunk(chunk_bytes: int, width: int) -> int:
    """Rows of a float32 chunk of at most `chunk_bytes` bytes (at least one row)."""
    if int(chunk_bytes) < 1:
        raise ValueError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
    return max(1, int(chunk_bytes) // (4 * max(1, int(width))))


def check_finite_chunks(
    flags: list[tuple[torch.Tensor, int, list]], store: Any, queries: list[torch.Tensor] | None = None
) -> None:
    """Raise if a chunk's scores held NaN/inf: `flags` are (non-finite flag on the device,
    first row, ids) per chunk, read with one sync at the end rather than one per chunk.
    `queries`: the prepared query side's tensors, blamed first (a query batch checked once is
    not scanned again on repeat, so one edited behind torch's back shows up here)."""
    bad = torch.stack([f for f, _, _ in flags]).cpu() if flags else torch.zeros(0, dtype=torch.bool)
    if bool(bad.any()):
        if any(not bool(torch.isfinite(t).all()) for t in queries or []):
            raise ValueError(
                "the prepared queries hold NaN/inf: their values changed after they were "
                "checked without torch seeing it (e.g. through .numpy() or .data); pass "
                "finite query gradients, e.g. a fresh copy"
            )
        _, start, ids = flags[int(bad.nonzero()[0])]
        raise StoreError(
            f"train rows {start}..{start + len(ids) - 1} (ids {ids[0]!r}..{ids[-1]!r}) give "
            f"non-finite scores: the store holds NaN/inf values; check it with "
            f"`logix inspect {store.path}` and log those examples again"
        )


def device_chunks(store: Any, device: torch.device, chunk_rows: int) -> Iterator[tuple[list, torch.Tensor]]:
    """(ids, rows [c, D] float32 on `device`) of a `Store` (or its share), in row order."""
    cuda = device.type == "cuda"
    dtype = TORCH_DTYPES[store.dtype] if cuda else torch.float32
    # A reader thread fills the next chunk while this one is scored; three reused host
    # buffers: the one being scored, the one read ahead, and the one the reader fills.
    source = read_ahead(store.iter_chunks(rows=chunk_rows, dtype=dtype, buffers=3))
    if not cuda:
        yield from source
        return
    yield from pinned_copies(source, device, chunk_rows, store.width, dtype)


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """`items`, produced one ahead by a background thread (reads release the GIL, so they
    overlap the consumer's matrix products). Errors are raised in the consumer."""
    slots: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(("end", done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            slots.put(("error", e))

    thread = threading.Thread(target=produce, name="logix-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def pinned_copies(
    items: Iterator[tuple[list, torch.Tensor]],
    device: torch.device,
    rows: int,
    width: int,
    dtype: torch.dtype,
) -> Iterator[tuple[list, torch.Tensor]]:
    """Copy host chunks to the device through two pinned buffers on a side stream.

    The compute stream waits for each copy; a pinned buffer is refilled only after its
    previous copy has completed. Yields float32 tensors upcast on the device.
    """
    copy_stream = torch.cuda.Stream(device)
    pinned = [torch.empty((rows, width), dtype=dtype, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]
    for n, (ids, x) in enumerate(items):
        slot = n % 2
        if copied[slot] is not None:
            copied[slot].synchronize()
        host = pinned[slot][: x.shape[0]]
        host.copy_(x)
        with torch.cuda.stream(copy_stream):
            on_device = host.to(device, non_blocking=True)
            copied[slot] = torch.cuda.Event()
            copied[slot].record(copy_stream)
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        on_device.record_stream(compute)
        yield ids, on_device.to(torch.float32)
