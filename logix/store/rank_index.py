"""`RankIndex`: one rank's index while its writer is open, shared by two threads under one lock.

The caller's thread starts segments and merges their meta; the writer's background thread adds
shard entries. Every access to the dict holds `lock`, and `write()` replaces the index file with
a snapshot, so the file always holds one consistent state (DESIGN §2).
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

from logix.store.format import SHARD_DIR, index_path, write_json_atomic
from logix.store.index import new_index, next_segment_name, read_index, read_indexes, segment_entry
from logix.store.lock import not_writable
from logix.store.paths import inside
from logix.store.recovery import adopt_unindexed, remove_tmp_files


class RankIndex:
    """This rank's index dict (`index`), the file it is written to and the other ranks'
    indexes as read at open time (`others`, never changed)."""

    def __init__(self, file: Path, index: dict, others: list[dict]) -> None:
        self.file = file
        self.index = index
        self.others = others
        self.lock = threading.Lock()

    def shards(self) -> list[dict]:
        """This rank's shard entries (the live list: read it while holding `lock`)."""
        return self.index["shards"]

    def segment_names(self) -> list[str]:
        """Segment names of this rank's index, then of the other ranks' (repeats kept)."""
        with self.lock:
            names = [s["name"] for s in self.index["segments"]]
        return names + [s["name"] for idx in self.others for s in idx.get("segments", [])]

    def last_segment(self) -> str | None:
        """Where a resumed writer appends: this rank's last segment, else the last segment of
        the other ranks, else None (no segment yet)."""
        with self.lock:
            own = [s["name"] for s in self.index["segments"]]
        other_names = [s["name"] for idx in self.others for s in idx.get("segments", [])]
        return (own or other_names or [None])[-1]

    def next_segment_name(self) -> str:
        """The next unused segment number over every rank."""
        return next_segment_name(self.segment_names())

    def merge_meta(self, name: str, meta: dict) -> None:
        """Merge `meta` into segment `name`'s meta, creating the segment's entry if needed."""
        with self.lock:
            segment_entry(self.index, name)["meta"].update(meta)

    def segment_meta(self, name: str) -> dict:
        """A copy of segment `name`'s meta in this rank's index ({} if unknown)."""
        with self.lock:
            for s in self.index["segments"]:
                if s["name"] == name:
                    return dict(s["meta"])
        return {}

    def next_seq(self) -> int:
        """The number of this rank's next shard."""
        with self.lock:
            return self.index["next_seq"]

    def add_shard(self, entry: dict) -> None:
        """Record a written shard (its segment gets an entry if it has none)."""
        with self.lock:
            self.index["shards"].append(entry)
            self.index["next_seq"] = entry["seq"] + 1
            segment_entry(self.index, entry["segment"])

    def set_finalized(self, done: bool) -> None:
        """Mark whether this rank's writer closed cleanly (readers report ranks that did not)."""
        with self.lock:
            self.index["finalized"] = done

    def write(self) -> None:
        """Replace the index file atomically with a snapshot of the index."""
        with self.lock:
            snapshot = copy.deepcopy(self.index)
        write_json_atomic(self.file, snapshot)


def open_rank_index(run_dir: Path, rank: int, width: int, dtype: str) -> RankIndex:
    """Take rank `rank`'s files over for a writer that holds its lock: remove its temporary
    files (their owner is gone), read its index (or start one), adopt its complete unindexed
    shards, mark it "not finalized" and write it. "finalized" turns true when the writer closes
    cleanly, so a reader tells a rank that stopped early (killed, crashed) from one that
    finished. A write that fails (read-only media) is a StoreError saying so."""
    try:
        inside(run_dir, SHARD_DIR).mkdir(exist_ok=True)
        remove_tmp_files(run_dir, rank)
        index = read_index(run_dir, rank) or new_index(rank)
        others = [i for r, i in read_indexes(run_dir).items() if r != rank]
        adopt_unindexed(run_dir, index, width, dtype)
        opened = RankIndex(index_path(run_dir, rank), index, others)
        opened.set_finalized(False)
        opened.write()
    except OSError as e:
        raise not_writable(run_dir, e) from e
    return opened
