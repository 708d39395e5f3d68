"""The data ids already taken in each segment, for the writer's duplicate check.

Read lazily from the shard headers of every rank (this rank's shards, adopted ones included,
and the other ranks' at open time), then kept up to date by the writer's own adds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from logix.errors import StoreError
from logix.store.format import shard_file, shard_layout
from logix.store.ids import DataId, check_one_kind, stored_ids


class TakenIds:
    """segment -> set of ids taken; `own_shards()` gives this rank's index entries."""

    def __init__(
        self,
        run_dir: Path,
        width: int,
        dtype: str,
        own_shards: Callable[[], list],
        others: list[dict],
        lock: threading.Lock,
    ) -> None:
        self.run_dir, self.width, self.dtype = Path(run_dir), width, dtype
        self._own_shards, self._others, self._lock = own_shards, others, lock
        self._ids: dict[str, set[DataId]] = {}
        self.kind: type | None = None  # int or str: the kind of every id of the store

    def check_kind(self, ids: list[DataId]) -> None:
        """Refuse a batch (of one kind, normalised) whose ids are not of the store's kind: one
        store holds int ids or string ids (1 and '1' would be two different examples). The kind
        is that of the ids already stored (one shard header is read), else of the first batch."""
        if not ids:
            return
        if self.kind is None:
            self.kind = self._stored_kind()
        if self.kind is not None and type(ids[0]) is not self.kind:
            check_one_kind(ids, "this batch", self.kind)

    def _stored_kind(self) -> type | None:
        for taken in self._ids.values():
            for i in taken:
                return type(i)
        with self._lock:
            shards = [s for s in self._own_shards() if s["rows"]]
        shards += [s for idx in self._others for s in idx.get("shards", []) if s["rows"]]
        for s in shards[:1]:
            try:
                _, _, meta = shard_layout(shard_file(self.run_dir, s["file"]), self.width, self.dtype)
                ids = stored_ids(meta.get("data_ids"), s["file"])
            except (OSError, TypeError) as e:
                raise StoreError(
                    f"cannot read the data ids of {s['file']} ({e}); check the store with "
                    f"`logix inspect {self.run_dir}`"
                ) from e
            return type(ids[0]) if ids else None
        return None

    def of(self, segment: str) -> set[DataId]:
        """The (live) set of ids taken in `segment`."""
        if segment not in self._ids:
            with self._lock:
                shards = [s for s in self._own_shards() if s["segment"] == segment]
            for idx in self._others:
                shards += [s for s in idx.get("shards", []) if s["segment"] == segment]
            taken: set[DataId] = set()
            for s in shards:
                try:
                    _, _, meta = shard_layout(shard_file(self.run_dir, s["file"]), self.width, self.dtype)
                    taken.update(stored_ids(meta["data_ids"], s["file"]))
                except StoreError:
                    raise
                except (OSError, KeyError, ValueError, TypeError) as e:
                    raise StoreError(
                        f"cannot read the data ids of {s['file']} to check for duplicates ({e}); "
                        f"check the store with `logix inspect {self.run_dir}`"
                    ) from e
            self._ids[segment] = taken
        return self._ids[segment]

    def check_new(self, segment: str, ids: list[DataId]) -> set[DataId]:
        """Raise if an id of `ids` repeats or is taken in `segment`; returns the taken set."""
        taken = self.of(segment)
        seen: set[DataId] = set()
        repeated = []
        for i in ids:
            if i in seen:
                repeated.append(i)
            seen.add(i)
        if repeated:
            raise StoreError(
                f"duplicate data id(s) {sorted(set(repeated), key=str)[:10]} within this batch of "
                f"{len(ids)}: each example of a batch needs its own id (check how the "
                "ids are built, e.g. logix.with_ids(dataset)); nothing of this batch was stored"
            )
        dups = [i for i in ids if i in taken]
        if dups:
            raise StoreError(
                f"duplicate data id(s) {sorted(set(dups), key=str)[:10]} in segment {segment!r}: "
                "ids must be unique within a segment (start a new segment to log the data again). "
                "When resuming after a crash, skip the ids already stored: after "
                "logix.init(run_dir, resume=True) and run.watch(model), run.logged_ids() gives "
                "them (it includes shards written just before the crash, which "
                "open_store(run_dir).data_ids does not list until a writer adopts them)"
            )
        return taken
