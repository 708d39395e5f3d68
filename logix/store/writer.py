"""`StoreWriter`: append rows of projected gradients to a store, off the training thread.

The caller hands over batches of rows `[B, D]` with their data ids; the writer checks them, keeps
them in a pending buffer, cuts full shards of `shard_rows` rows and queues them for one
background thread. That thread calls the observers (curvature statistics), serialises the shard,
writes it under a temporary name, renames it and then replaces the rank's index atomically, so a
crash at any point leaves every completed shard readable and nothing half-written (DESIGN §2).
One writer per (run directory, rank): it holds the rank's lock (`store.lock`) while open.
"""

from __future__ import annotations

import atexit
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from logix.errors import StoreError
from logix.notices import warn
from logix.store.format import check_segment_name
from logix.store.ids import DataId, batch_ids, normalise_ids
from logix.store.lock import writer_lock
from logix.store.manifest import read_manifest
from logix.store.pending_shard import PendingShard
from logix.store.rank_index import open_rank_index
from logix.store.shard_io import TORCH_DTYPES, nonfinite_rows, overflow_error, write_shard
from logix.store.shard_queue import ShardQueue
from logix.store.taken_ids import TakenIds
from logix.store.unclosed import pending_outcome, warn_closed_at_exit, warn_taken_over
from logix.vocabulary import STORAGE_DTYPES

__all__ = ["StoreWriter", "DataId", "batch_ids", "normalise_ids", "nonfinite_rows"]
Observer = Callable[[str, torch.Tensor], None]


class StoreWriter:
    """Writes one rank's shards and index into an existing store directory.

    Use `add(ids, rows)` from the training loop, `start_segment()` between checkpoints or stages,
    and `close()` (or a `with` block) at the end. Errors of the background thread are raised by
    the next `add` / `flush` / `close`. A writer never closed flushes at interpreter exit, with
    a warning (see `_close_at_exit`).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        width: int,
        dtype: str = "float32",
        shard_rows: int = 4096,
        rank: int = 0,
        observers: Sequence[Observer] = (),
        queue_depth: int = 4,
        max_shard_bytes: int = 64 << 20,
    ) -> None:
        self.run_dir = Path(run_dir)
        manifest = read_manifest(self.run_dir)
        if dtype not in STORAGE_DTYPES:
            raise StoreError(f"storage dtype {dtype!r} is not one of {STORAGE_DTYPES}")
        if manifest.get("width") != width or manifest.get("dtype") != dtype:
            raise StoreError(
                f"writer (width {width}, dtype {dtype}) does not match the store's manifest "
                f"(width {manifest.get('width')}, dtype {manifest.get('dtype')}) at "
                f"{self.run_dir}: log into a new run directory or use the manifest's settings"
            )
        if shard_rows < 1 or queue_depth < 1:
            raise ValueError("shard_rows and queue_depth must be at least 1")
        self.width, self.dtype, self.rank = int(width), dtype, int(rank)
        # Rows are gathered in shard buffers that are reused: no allocation (and no page
        # faults) per step. A shard holds at most `max_shard_bytes` of them, so the buffers
        # (one filling, the others queued or being written) stay small for wide rows.
        self.shard_rows = max(1, min(int(shard_rows), int(max_shard_bytes) // (4 * self.width)))
        self.observers = list(observers)
        # Rows are converted to the storage dtype (and checked for overflow) on the caller's
        # thread, one batch at a time, straight into the shard buffer; with observers the
        # buffers stay float32, since the observers' statistics are of the unrounded rows.
        self._buffer_dtype = torch.float32 if self.observers else TORCH_DTYPES[dtype]
        self._reserved: list[torch.Tensor] = []  # float32 rows handed out by reserve()
        self._converted: list[torch.Tensor] = []  # one batch in the storage dtype

        self._closed_why, self._failed = "", False
        # before touching any file of the rank; an abandoned writer of this process gives way
        self._held = writer_lock(self.run_dir, self.rank, give_way=self._give_way)
        try:
            self._index = open_rank_index(self.run_dir, self.rank, self.width, self.dtype)
        except BaseException:
            self._held.release()
            raise
        self._segment: str | None = self._index.last_segment()
        self._taken = TakenIds(
            self.run_dir, self.width, self.dtype, self._index.shards, self._index.others, self._index.lock
        )
        self._closed = False
        self._jobs = ShardQueue(
            self._write_rows,
            self._index.write,
            self.shard_rows,
            self.width,
            queue_depth,
            f"logix-writer-{rank}",
            str(self.run_dir),
            self._buffer_dtype,
        )
        self._pending = PendingShard(self._jobs, self.shard_rows, self.width)
        atexit.register(self._close_at_exit)

    @property
    def buffers(self) -> int:
        """Shard buffers allocated so far (they are reused: a long run allocates no more)."""
        return self._jobs.buffers

    # ----------------------------------------------------------------------------- segments
    @property
    def segment(self) -> str | None:
        """The segment that `add` appends to (None until the first segment exists)."""
        return self._segment

    def segment_names(self) -> list[str]:
        """The names of every segment of the store (this rank's and the others')."""
        return list(dict.fromkeys(self._index.segment_names()))

    def start_segment(self, name: str | None = None, meta: dict | None = None) -> str:
        """Flush the current segment's rows and make `name` current (default: next number)."""
        self._check_usable()
        if name is None:
            name = self._index.next_segment_name()
        check_segment_name(name)
        if meta is not None:
            json.dumps(meta)  # fail here, not in the background thread
        self._cut()
        self._index.merge_meta(name, meta or {})
        self._segment = name
        self._jobs.put_index()
        return name

    def update_segment_meta(self, meta: dict) -> None:
        """Merge `meta` (JSON-able) into the current segment's meta and persist it."""
        self._check_usable()
        json.dumps(meta)
        if self._segment is None:
            self.start_segment(meta=meta)
            return
        self._index.merge_meta(self._segment, meta)
        self._jobs.put_index()

    def segment_meta(self, name: str) -> dict:
        """A copy of segment `name`'s meta as this rank's index holds it ({} if unknown)."""
        return self._index.segment_meta(name)

    # ----------------------------------------------------------------------------- adding rows
    def add(self, ids: Sequence[DataId], rows: torch.Tensor) -> None:
        """Queue rows `[B, D]` (any float dtype / device) with their `B` data ids.

        Nothing of the batch is stored when it fails a check. Rows are copied into the current
        shard buffer, unless they already are its slice from `reserve()`.
        """
        self._check_open()
        if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or rows.shape[1] != self.width:
            shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise StoreError(f"rows must be a tensor [B, {self.width}], got {shape}")
        if not rows.is_floating_point():
            raise StoreError(f"rows must be floating point, got {rows.dtype}")
        ids = normalise_ids(ids)
        if len(ids) != rows.shape[0]:
            raise StoreError(f"{len(ids)} data ids for {rows.shape[0]} rows: pass one id per row")
        self.add_checked(ids, rows, nonfinite_rows(rows))

    def add_checked(self, ids: list[DataId], rows: torch.Tensor, nonfinite: list[int]) -> None:
        """`add` for a caller that has already checked what it needs itself: `ids` normalised
        (`batch_ids` / `normalise_ids`), rows a float tensor [len(ids), D], `nonfinite` the
        indices `nonfinite_rows(rows)` gave. The run's logging path; duplicates are checked
        here, and a batch with non-finite rows is refused, as by `add`."""
        self._check_open()
        segment = self._segment if self._segment is not None else self._index.next_segment_name()
        self._taken.check_kind(ids)
        taken = self._taken.check_new(segment, ids)
        bad = [ids[j] for j in nonfinite]
        if bad:
            raise StoreError(
                f"non-finite gradient rows (NaN/inf) for data id(s) {bad[:10]}: check the loss "
                "of these examples; nothing of this batch was stored"
            )
        if rows.dtype != self._buffer_dtype:  # float16 / bfloat16 rows, converted once here
            rows = _scratch(self._converted, len(ids), self.width, self._buffer_dtype).copy_(rows.detach())
            bad = [ids[j] for j in nonfinite_rows(rows)]
            if bad:
                raise overflow_error(bad, self.dtype)
        self._raise_error()
        if self._segment is None:
            self.start_segment(segment)
        taken.update(ids)
        if self._taken.kind is None and ids:
            self._taken.kind = type(ids[0])
        self._pending.append(segment, ids, rows.detach())

    def reserve(self, n: int) -> torch.Tensor:
        """A [n, D] float32 CPU tensor to fill and pass to `add`: a slice of the current shard
        buffer when the rows fit in it (then `add` copies nothing), else a new tensor (always
        for a float16 / bfloat16 store: `add` converts the rows into the buffer)."""
        if self._buffer_dtype != torch.float32:  # reused: no allocation (page faults) per step
            return _scratch(self._reserved, n, self.width, torch.float32)
        return self._pending.reserve(n, take_buffer=not self._closed and self._jobs.error is None)

    def _cut(self) -> None:
        """Queue the current shard buffer (full, or partial at a flush) for writing."""
        self._pending.cut(self._segment)

    def logged_ids(self, segment: str | None = None) -> set[DataId]:
        """Ids in `segment` (default: current): on disk at open time (adopted shards included)
        plus all added since."""
        segment = segment if segment is not None else self._segment
        if segment is None:
            return set()
        return set(self._taken.of(segment))

    # ----------------------------------------------------------------------------- closing
    def flush(self) -> None:
        """Write the pending rows as a (possibly smaller) shard and wait until all are on disk."""
        self._check_open()
        self._raise_error()
        self._cut()
        self._jobs.join()
        self._raise_error()

    def close(self) -> None:
        """Flush, stop the background thread, mark this rank's index finalized and release the
        rank's lock; idempotent."""
        if self._closed:
            return
        atexit.unregister(self._close_at_exit)
        try:
            self._stop()
            self._raise_error()
            self._index.set_finalized(True)
            self._index.write()
        finally:
            self._held.release()

    def _stop(self) -> None:
        """Hand the pending shard to the background thread (unless it failed), then stop it."""
        try:
            if self._jobs.error is None:
                self._cut()
        finally:
            self._closed = True
            self._jobs.stop()

    def abandon(self, why: str) -> None:
        """Stop without finalizing: write the rows accepted so far, leave this rank marked "not
        finalized" and release the lock (a run whose set-up failed, or one taken over). Any
        later use raises a StoreError saying `why`. Raises nothing (after a failed `close()`
        it only makes sure the thread is stopped and the lock released)."""
        self._closed_why = self._closed_why or why
        atexit.unregister(self._close_at_exit)
        try:
            if not self._closed:
                self._stop()
        except Exception:  # noqa: BLE001 - the caller reports the error that led here
            pass
        finally:
            self._held.release()

    def mark_failed(self) -> None:
        """The run of this writer failed (an exception left one of its blocks): should a later
        writer of this process ask for this rank, this one gives way (see `_give_way`)."""
        self._failed = True

    def _give_way(self) -> bool:
        """A later writer of this process wants this rank's lock. A writer whose run failed (see
        `mark_failed`) or whose disk writes failed ends now, loudly, and gives way (True); a
        healthy one keeps its rank (False: the later writer is refused)."""
        if not (self._failed or self._jobs.error is not None):
            return False
        pending = len(self._pending.ids) + self._jobs.queued_rows()
        self.abandon("another writer of this process has taken over its rank")
        warn_taken_over(self.run_dir, self.rank, pending_outcome(pending, self._jobs.error))
        return True

    def _close_at_exit(self) -> None:
        """At interpreter exit, write the rows this writer accepted (each is complete and
        checked; losing them silently is the worse outcome), leave the rank marked "not
        finalized" (so `logix inspect` shows the run did not finish) and warn."""
        if self._closed:
            return
        pending = len(self._pending.ids) + self._jobs.queued_rows()
        try:
            self._stop()
        finally:
            self._held.release()
        warn_closed_at_exit(self.run_dir, self.rank, pending_outcome(pending, self._jobs.error))

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except StoreError as e:  # keep the original exception; still say what was lost
            warn(f"closing the store writer failed too: {e}")

    # ----------------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            why = f": {self._closed_why}" if self._closed_why else ""
            raise StoreError(f"the store writer is closed{why}")

    def _check_usable(self) -> None:
        self._check_open()
        self._raise_error()

    def _raise_error(self) -> None:
        self._jobs.raise_error()

    def _write_rows(self, segment: str, ids: list[DataId], rows: torch.Tensor) -> None:
        """On the background thread: observers, then the shard file, then the index."""
        for fn in self.observers:
            fn(segment, rows)
        seq = self._index.next_seq()
        entry = write_shard(self.run_dir, segment, self.rank, seq, ids, rows, self.width, self.dtype)
        self._index.add_shard(entry)
        self._index.write()


def _scratch(held: list[torch.Tensor], n: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The first n rows of a [m, width] tensor kept in `held` (replaced by a larger one when
    n > m), for one batch at a time: `add` copies its contents into the shard buffer before the
    next batch gets it."""
    if not held or held[0].shape[0] < n:
        held[:] = [torch.empty(n, width, dtype=dtype)]
    return held[0][:n]
