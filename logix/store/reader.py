"""`open_store`: read a gradient store with bounded memory, at the disk's sequential rate.

The reader merges the per-rank indexes, checks the listed shards (size, optionally crc32 and
every header) and streams rows in chunks of a fixed number of rows that span shard boundaries.
Shard data is read with `pread` straight into the chunk's tensor, a few reads in flight and one
chunk ahead (`row_reader.RowReader`), so a few chunks are the only sizeable allocations, a store
larger than RAM streams, and a cold one streams at the disk's rate. Complete shards that
no index lists yet (a writer stopped, or is, between renaming a shard and updating its index)
are reported, not read: a resumed writer adopts them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch

from logix.errors import StoreError
from logix.notices import warn
from logix.store import integrity
from logix.store.format import ModuleInfo, curvature_dir
from logix.store.ids import DataId
from logix.store.index import read_indexes, segment_metas, segment_shards, valid_segment
from logix.store.manifest import read_manifest
from logix.store.projections import check_projections
from logix.store.ranks import check_ranks, manifest_ranks
from logix.store.recovery import unindexed_shards
from logix.store.row_reader import RowReader, read_chunks
from logix.store.shard_header import read_listed_header
from logix.store.shard_io import TORCH_DTYPES
from logix.vocabulary import VERIFY_LEVELS, check_choice

__all__ = ["open_store", "Store", "TORCH_DTYPES", "DataId"]
VERIFY_MODES = VERIFY_LEVELS


def open_store(
    path: str | Path, segment: str | None = None, verify: str = "quick", missing_ranks: str = "error"
) -> Store:
    """Open the store at `path` and select `segment` (default: the last one).

    verify: "quick" checks each listed shard exists with its recorded size (catches truncation)
    and the projections file's digest against the manifest; "full" also checks every shard's
    crc32 and header against index and manifest, repeated ids, and the curvature files (reads
    all bytes; see `integrity.verify_store`); "none" skips them.
    missing_ranks: a rank the manifest names without an index (its rows are missing) is an
    error ("error", the default, at every verify level) or a warning ("warn": open the rest).
    """
    check_choice(verify, VERIFY_LEVELS, "verify level")
    path = Path(path)
    manifest = read_manifest(path)
    indexes = read_indexes(path)
    check_ranks(path, manifest, indexes, missing_ranks)
    if verify != "none":
        check_projections(path, manifest)
    store = Store(path, manifest, indexes, segment, verify)
    if verify == "full":
        problems = integrity.verify_curvature(store.curvature_dir)
        if problems:
            raise StoreError(f"store {path}, segment {store.segment!r}: " + "; ".join(problems))
    return store


class Store:
    """A view of one segment of a store: ids and rows in (rank, seq) shard order."""

    def __init__(
        self,
        path: Path,
        manifest: dict,
        indexes: dict[int, dict],
        segment: str | None,
        verify: str,
        unindexed: list[dict] | None = None,
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.config: dict = manifest.get("config", {})
        self.modules: list[ModuleInfo] = [ModuleInfo.from_dict(m) for m in manifest["modules"]]
        self.width: int = int(manifest["width"])
        self.dtype: str = manifest["dtype"]
        self.fingerprint: str = manifest.get("fingerprint", "")
        self.ranks: list[int] = sorted(indexes)
        self._indexes = indexes
        self._verify_mode = verify
        if unindexed is None:
            unindexed = unindexed_shards(self.path, indexes, self.width, self.dtype)
        self._unindexed = unindexed

        metas = segment_metas(indexes)
        self.segments: list[str] = list(metas)
        self._metas = metas
        if segment is None:
            segment = self.segments[-1] if self.segments else "0"
        elif segment not in metas:
            raise StoreError(f"{self.path} has no segment {segment!r}; its segments are {self.segments}")
        self.segment: str = valid_segment(segment, "the segment asked for")
        self.segment_meta: dict = dict(metas.get(segment, {}))
        self.shards: list[dict] = segment_shards(indexes, segment)
        self.starts = [0]  # row index of each shard's first row, then the total
        for sh in self.shards:
            self.starts.append(self.starts[-1] + int(sh["rows"]))
        self._layouts: list[tuple[int, list] | None] = [None] * len(self.shards)
        self._data_ids: list[DataId] | None = None
        self.row_offset = 0  # of a `shard_view`: its first row's index in the whole segment
        if self.unindexed_shards and verify != "none":
            rows = sum(sh["rows"] for sh in self.unindexed_shards)
            warn(
                f"{self.path}, segment {self.segment!r}: {len(self.unindexed_shards)} complete "
                f"shard(s) ({rows} rows) are not in the index yet (a writer stopped between writing "
                "a shard and updating its index, or is doing so now); they are not included here. "
                "logix.init(run_dir, resume=True) adopts them; after run.watch(model), "
                "run.logged_ids() lists every stored id",
            )
        if verify != "none":
            self.verify(full=verify == "full")
            if verify == "full" or len({sh["rank"] for sh in self.shards}) > 1:
                self.check_unique_ids()

    # ----------------------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return self.starts[-1]

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, segment={self.segment!r}, rows={len(self)}, "
            f"width={self.width}, dtype={self.dtype}, shards={len(self.shards)})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the selected segment's shard files."""
        return sum(int(sh["bytes"]) for sh in self.shards)

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def curvature_dir(self) -> Path:
        """Where curvature statistics of the selected segment live."""
        return curvature_dir(self.path, self.segment)

    @property
    def unindexed_shards(self) -> list[dict]:
        """Complete shards of the selected segment that no index lists (entries with "file",
        "rows", "rank", "data_ids"): not part of this view; a resumed writer adopts them."""
        return [sh for sh in self._unindexed if sh["segment"] == self.segment]

    @property
    def all_unindexed_shards(self) -> list[dict]:
        """`unindexed_shards` of every segment (also of segments that no index names)."""
        return list(self._unindexed)

    def select(self, segment: str, verify: str | None = None) -> Store:
        """The same store viewed on another segment (checked with this store's verify mode)."""
        return Store(
            self.path,
            self.manifest,
            self._indexes,
            segment,
            self._verify_mode if verify is None else verify,
            self._unindexed,
        )

    def shard_offset(self, i: int) -> int:
        """The file offset of row 0 of shard i."""
        return self._layout(i)[0]

    def shard_ids(self, i: int) -> list[DataId]:
        """The data ids of shard i, from its header."""
        return self._layout(i)[1]

    def _layout(self, i: int) -> tuple[int, list]:
        """(absolute data offset, data ids) of shard i, read from its header once and checked
        against the index and the manifest (width, dtype, rows, segment, rank)."""
        if self._layouts[i] is None:
            self._layouts[i] = read_listed_header(self.path, self.shards[i], self.width, self.dtype)
        return self._layouts[i]  # type: ignore[return-value]

    @property
    def data_ids(self) -> list[DataId]:
        """The caller's ids in row order (read from the shard headers once, then cached)."""
        if self._data_ids is None:
            ids: list[DataId] = []
            kinds: dict[type, str] = {}  # kind of id (each shard holds one) -> its first shard
            for i in range(len(self.shards)):
                part = self._layout(i)[1]
                if part:
                    kinds.setdefault(type(part[0]), self.shards[i]["file"])
                ids += part
            if len(kinds) > 1:
                listing = " and ".join(f"{k.__name__} ids in {f}" for k, f in kinds.items())
                raise StoreError(
                    f"store {self.path}, segment {self.segment!r} holds {listing}: one store holds "
                    "one kind of id (1 and '1' would be two different examples), so the store was "
                    "changed outside logix. Log one of those shards' rows again with ids of the other kind"
                )
            self._data_ids = ids
        return self._data_ids

    def shard_view(self, first: int, stop: int) -> Store:
        """The rows of shards [first, stop) of this view, as a Store (for a rank's share of a
        distributed query); `row_offset` is the global index of its first row."""
        if not 0 <= first <= stop <= len(self.shards):
            raise ValueError(f"shard range [{first}, {stop}) is outside 0..{len(self.shards)}")
        view = copy.copy(self)
        view.shards = self.shards[first:stop]
        view.starts = [s - self.starts[first] for s in self.starts[first : stop + 1]]
        view._layouts = self._layouts[first:stop]
        view._data_ids = (
            None if self._data_ids is None else self._data_ids[self.starts[first] : self.starts[stop]]
        )
        view.row_offset = self.row_offset + self.starts[first]
        return view

    # ----------------------------------------------------------------------------- ranks
    def rank_status(self) -> dict[int, str]:
        """Per writing rank: "finalized" (its writer closed cleanly), "not finalized" (still
        logging, or stopped early: rows after its last completed shard are not stored) or "no
        index" (named in the manifest's `ranks` but it wrote nothing)."""
        expected = set(manifest_ranks(self.manifest, self.path))
        status = {}
        for rank in sorted(expected | set(self.ranks)):
            if rank not in self._indexes:
                status[rank] = "no index"
            else:  # indexes written before the flag existed count as finalized
                done = self._indexes[rank].get("finalized", True)
                status[rank] = "finalized" if done else "not finalized"
        return status

    def rows_by_rank(self) -> dict[int, int]:
        """Rows in each rank's completed shards, over all segments."""
        return {r: sum(int(sh["rows"]) for sh in idx.get("shards", [])) for r, idx in self._indexes.items()}

    @property
    def unfinalized_ranks(self) -> list[int]:
        """Ranks whose logging did not finish with `run.finalize()` (see `rank_status`)."""
        return [r for r, s in self.rank_status().items() if s != "finalized"]

    def missing_ids(self, expected) -> list[DataId]:
        """The ids of `expected` (ints or strings, in its order) that the selected segment
        lacks: what to log again after a rank stopped early (ids of complete shards that are
        not indexed yet count as present: a resumed writer adopts them)."""
        if isinstance(expected, torch.Tensor):
            expected = expected.tolist()
        have = set(self.data_ids)
        for sh in self.unindexed_shards:
            have.update(sh["data_ids"])
        return [i for i in expected if i not in have]

    # ----------------------------------------------------------------------------- integrity
    def check_unique_ids(self) -> None:
        """Raise if a data id appears twice in the selected segment (see `integrity`)."""
        integrity.check_unique_ids(self)

    def verify(self, full: bool = True) -> None:
        """Check the selected segment's shards: existence and size; with `full` also crc32 and
        every header against index and manifest (see `integrity.verify_shards`)."""
        integrity.verify_shards(self, full)

    # ----------------------------------------------------------------------------- rows
    def iter_chunks(
        self, rows: int = 4096, *, dtype: torch.dtype = torch.float32, buffers: int = 0
    ) -> Iterator[tuple[list[DataId], torch.Tensor]]:
        """Yield (ids, tensor [rows, D]) in row order; the last chunk may be smaller.

        Each chunk is read as a few pieces in flight on a small thread pool. buffers=0: each
        chunk is a fresh tensor (safe to keep), and the next one is read while the consumer
        holds this one. buffers=k >= 1: chunks cycle through k preallocated tensors, so a chunk
        stays valid only until k more chunks have been yielded (behind a read-ahead thread of
        depth d use k = d + 2); nothing is read before it is asked for. Reusing memory is
        several times faster on cached data (no page faults) and keeps the heap from growing.
        """
        yield from read_chunks(self, rows, dtype, buffers)

    def load(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows of the selected segment as one tensor [N, D] (for stores that fit in RAM)."""
        n = len(self)
        out = torch.empty((n, self.width), dtype=dtype)
        if n:
            reader = RowReader(self)
            try:
                reader.read_into(out, 0)
            finally:
                reader.close()
        return out
