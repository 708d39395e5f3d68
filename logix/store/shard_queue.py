"""The writer's background thread: a bounded queue of jobs (shards to write, index updates)
and a small pool of reusable shard buffers, so the training step never waits on disk.

An error in the thread is kept and raised on the caller's thread by the next `raise_error()`;
after it, queued jobs are drained without writing.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from logix.errors import StoreError

_STOP = object()


class ShardQueue:
    """Runs `write_shard(segment, ids, rows)` and `write_index()` jobs in order on one thread.

    Shard buffers are [shard_rows, width] of `dtype`; at most `min(depth, 2) + 1` exist (one being
    filled, the others queued or being written), which bounds the rows a crash can lose."""

    def __init__(
        self,
        write_shard: Callable[[str, list, torch.Tensor], None],
        write_index: Callable[[], None],
        shard_rows: int,
        width: int,
        depth: int,
        name: str,
        where: str,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dtype = dtype
        self._write_shard, self._write_index = write_shard, write_index
        self.shard_rows, self.width, self._where = shard_rows, width, where
        self._free: queue.Queue = queue.Queue()  # buffers the thread has finished with
        self.buffers = 0  # shard buffers allocated so far
        self._max_buffers = min(depth, 2) + 1
        self.error: BaseException | None = None
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def take_buffer(self) -> torch.Tensor:
        """A free shard buffer; blocks while all are queued (back-pressure on a slow disk)."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self.buffers < self._max_buffers:
            self.buffers += 1
            return torch.empty(self.shard_rows, self.width, dtype=self.dtype)
        while True:
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                self.raise_error()

    def put_shard(self, segment: str, ids: list, buffer: torch.Tensor) -> None:
        self._jobs.put(("shard", segment, ids, buffer))  # blocks when `depth` jobs wait

    def put_index(self) -> None:
        self._jobs.put(("index",))

    def queued_rows(self) -> int:
        """Rows in shards queued and not yet written (approximate while the thread runs)."""
        return sum(len(job[2]) for job in list(self._jobs.queue) if job is not _STOP and job[0] == "shard")

    def join(self) -> None:
        """Wait until every queued job is done."""
        self._jobs.join()

    def stop(self) -> None:
        """Finish the queued jobs and end the thread."""
        self._jobs.put(_STOP)
        self._thread.join()

    def raise_error(self) -> None:
        if self.error is not None:
            raise StoreError(
                f"background writer failed: {self.error!r}; rows added since the last completed "
                f"shard are not stored (ids on disk: open_store({self._where!r}))"
            ) from self.error

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is _STOP:
                    return
                if self.error is None:  # after an error, drain jobs without writing
                    if job[0] == "shard":
                        _, segment, ids, buffer = job
                        try:
                            self._write_shard(segment, ids, buffer[: len(ids)])
                        finally:
                            self._free.put(buffer)
                    else:
                        self._write_index()
            except BaseException as e:  # noqa: BLE001 - surfaced on the caller's thread
                self.error = e
            finally:
                self._jobs.task_done()
