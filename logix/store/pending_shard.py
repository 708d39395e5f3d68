"""`PendingShard`: the writer's shard being filled, cut when full in rows or in its ids' bytes.

Rows are copied into a reusable buffer [shard_rows, D] taken from the background queue (in the
storage dtype, or float32 for a writer with observers);
a full buffer (or a partial one at a flush) goes back to the queue to be written. A shard's ids
are stored as JSON in its header, so a shard is also cut before their bytes pass
`MAX_SHARD_ID_BYTES`.
"""

from __future__ import annotations

import itertools

import torch

from logix.store.ids import MAX_SHARD_ID_BYTES, DataId, id_json_bound
from logix.store.shard_queue import ShardQueue


class PendingShard:
    """The rows added since the last cut: `buffer` (None until needed), the `ids` of its filled
    rows and their JSON bytes."""

    def __init__(self, jobs: ShardQueue, shard_rows: int, width: int) -> None:
        self._jobs = jobs
        self.shard_rows, self.width = shard_rows, width
        self.buffer: torch.Tensor | None = None
        self.ids: list[DataId] = []
        self.id_bytes = 0

    def append(self, segment: str, ids: list[DataId], rows: torch.Tensor) -> None:
        """Copy checked rows [len(ids), D] of `segment` into shard buffers, cutting a shard when
        it is full in rows or in the JSON bytes of its ids (which bound its header)."""
        bounds = [0, *itertools.accumulate(map(id_json_bound, ids))]
        done = 0
        while done < len(ids):
            if self.buffer is None:
                self.buffer = self._jobs.take_buffer()
            start = len(self.ids)
            take = min(self.shard_rows - start, len(ids) - done)
            budget = MAX_SHARD_ID_BYTES - self.id_bytes
            while take > 1 and bounds[done + take] - bounds[done] > budget:
                take //= 2
            if start and bounds[done + take] - bounds[done] > budget:
                self.cut(segment)  # the ids would not fit this shard's header budget
                continue
            target = self.buffer[start : start + take]
            if target.data_ptr() != rows[done:].data_ptr():  # rows from reserve() are in place
                target.copy_(rows[done : done + take])
            self.ids += ids[done : done + take]
            self.id_bytes += bounds[done + take] - bounds[done]
            done += take
            if len(self.ids) == self.shard_rows:
                self.cut(segment)

    def reserve(self, n: int, take_buffer: bool) -> torch.Tensor:
        """A [n, D] float32 CPU tensor to fill: a slice of the buffer when the rows fit in it
        (`take_buffer`: take a buffer first if there is none), else a new tensor."""
        if self.buffer is None and take_buffer:
            self.buffer = self._jobs.take_buffer()
        start = len(self.ids)
        if self.buffer is not None and start + n <= self.shard_rows:
            return self.buffer[start : start + n]
        return torch.empty(n, self.width)

    def cut(self, segment: str | None) -> None:
        """Queue the buffer (full, or partial at a flush) to be written as a shard of `segment`."""
        if self.buffer is None or not self.ids:
            return
        self._jobs.put_shard(segment, self.ids, self.buffer)  # type: ignore[arg-type]
        self.buffer, self.ids, self.id_bytes = None, [], 0
