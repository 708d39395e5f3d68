"""`open_store`: read a gradient store with bounded memory, at the disk's sequential rate.

The reader merges the per-rank indexes, checks the listed shards (size, optionally crc32) and
streams rows in chunks of a fixed number of rows that span shard boundaries. Shard data is read
with `pread` straight into the chunk's tensor (parsing the safetensors header ourselves), so a
chunk is the only sizeable allocation and a store larger than RAM streams.
"""

from __future__ import annotations

import bisect
import copy
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from logix.store.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_DIR,
    MANIFEST,
    SAFETENSORS_DTYPES,
    file_crc32,
    STORAGE_DTYPES,
    ModuleInfo,
    StoreError,
    curvature_dir,
    read_json,
    shard_layout,
)

DataId = int | str
VERIFY_MODES = ("none", "quick", "full")
# Storage dtype names (the manifest's "dtype") -> torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CRC_BLOCK = 16 << 20


def _logix_version() -> str:
    try:
        from importlib.metadata import version

        return version("logix")
    except Exception:  # noqa: BLE001 - only used in a message
        return "unknown"


def _damage_fix(rel: str) -> str:
    return (
        f"Nothing was changed on disk. Restore {rel} from a backup if you have one, or log the "
        "rows of that shard again (e.g. into a new run or segment); open_store(path, "
        "verify='none') opens the store anyway, but reading that shard will fail."
    )


def open_store(path: str | Path, segment: str | None = None, verify: str = "quick") -> "Store":
    """Open the store at `path` and select `segment` (default: the last one).

    verify: "quick" checks each listed shard exists with its recorded size (catches truncation),
    "full" also checks every shard's crc32 (reads all bytes), "none" skips both.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        what = "does not exist" if not path.exists() else "has no manifest.json"
        raise StoreError(
            f"{path} is not a logix store: it {what} (logix.init(path) creates a store)"
        )
    manifest = read_json(manifest_file)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{manifest_file} is not a logix store manifest (format != {FORMAT_NAME!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version < 1:
        raise StoreError(f"{manifest_file} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by a newer logix (store format version {version}; logix "
            f"{_logix_version()} reads up to version {FORMAT_VERSION}): upgrade logix "
            "(pip install -U logix)"
        )
    if manifest.get("dtype") not in STORAGE_DTYPES:
        raise StoreError(f"{manifest_file} names an unknown storage dtype {manifest.get('dtype')!r}")
    indexes: dict[int, dict] = {}
    for p in sorted((path / INDEX_DIR).glob("rank-*.json")):
        idx = read_json(p)
        rank = int(p.stem.split("-")[1])
        if idx.get("rank") != rank:
            raise StoreError(f"{p} says rank {idx.get('rank')}; the file name says rank {rank}")
        indexes[rank] = idx
    return Store(path, manifest, indexes, segment, verify)


class Store:
    """A view of one segment of a store: ids and rows in (rank, seq) shard order."""

    def __init__(self, path: Path, manifest: dict, indexes: dict[int, dict],
                 segment: str | None, verify: str) -> None:
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

        metas: dict[str, dict] = {}
        for rank in self.ranks:  # first appearance wins the order; the lowest rank wins meta keys
            idx = indexes[rank]
            for s in idx.get("segments", []):
                metas.setdefault(s["name"], {})
                metas[s["name"]] = {**s.get("meta", {}), **metas[s["name"]]}
            for sh in idx.get("shards", []):
                metas.setdefault(sh["segment"], {})
        self.segments: list[str] = list(metas)
        self._metas = metas
        if segment is None:
            segment = self.segments[-1] if self.segments else "0"
        elif segment not in metas:
            raise StoreError(
                f"{self.path} has no segment {segment!r}; its segments are {self.segments}"
            )
        self.segment: str = segment
        self.segment_meta: dict = dict(metas.get(segment, {}))
        self.shards: list[dict] = sorted(
            ({**sh, "rank": rank} for rank in self.ranks
             for sh in indexes[rank].get("shards", []) if sh["segment"] == segment),
            key=lambda sh: (sh["rank"], sh["seq"]),
        )
        self._starts = [0]
        for sh in self.shards:
            self._starts.append(self._starts[-1] + int(sh["rows"]))
        self._layouts: list[tuple[int, list] | None] = [None] * len(self.shards)
        self._data_ids: list[DataId] | None = None
        self.row_offset = 0  # of a `shard_view`: its first row's index in the whole segment
        if verify != "none":
            self.verify(full=verify == "full")
            if len({sh["rank"] for sh in self.shards}) > 1:
                self.check_unique_ids()

    # ----------------------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}, segment={self.segment!r}, rows={len(self)}, "
                f"width={self.width}, dtype={self.dtype}, shards={len(self.shards)})")

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

    def select(self, segment: str, verify: str | None = None) -> "Store":
        """The same store viewed on another segment (checked with this store's verify mode)."""
        return Store(self.path, self.manifest, self._indexes, segment,
                     self._verify_mode if verify is None else verify)

    def _layout(self, i: int) -> tuple[int, list]:
        """(absolute data offset, data ids) of shard i, read from its header once."""
        if self._layouts[i] is None:
            sh = self.shards[i]
            file = self.path / sh["file"]
            try:
                rows, offset, meta = shard_layout(file, self.width, self.dtype)
                ids = json.loads(meta["data_ids"])
            except FileNotFoundError:
                raise StoreError(f"shard {sh['file']} is missing. {_damage_fix(sh['file'])}")
            except (KeyError, ValueError) as e:
                raise StoreError(f"shard {sh['file']} has damaged metadata ({e}). "
                                 f"{_damage_fix(sh['file'])}") from e
            if rows != sh["rows"] or len(ids) != rows:
                raise StoreError(
                    f"shard {sh['file']} holds {rows} rows and {len(ids)} ids, the index records "
                    f"{sh['rows']} rows. {_damage_fix(sh['file'])}"
                )
            self._layouts[i] = (offset, ids)
        return self._layouts[i]  # type: ignore[return-value]

    @property
    def data_ids(self) -> list[DataId]:
        """The caller's ids in row order (read from the shard headers once, then cached)."""
        if self._data_ids is None:
            ids: list[DataId] = []
            for i in range(len(self.shards)):
                ids += self._layout(i)[1]
            self._data_ids = ids
        return self._data_ids

    def shard_view(self, first: int, stop: int) -> "Store":
        """The rows of shards [first, stop) of this view, as a Store (for a rank's share of a
        distributed query); `row_offset` is the global index of its first row."""
        if not 0 <= first <= stop <= len(self.shards):
            raise ValueError(f"shard range [{first}, {stop}) is outside 0..{len(self.shards)}")
        view = copy.copy(self)
        view.shards = self.shards[first:stop]
        view._starts = [s - self._starts[first] for s in self._starts[first:stop + 1]]
        view._layouts = self._layouts[first:stop]
        view._data_ids = None if self._data_ids is None else \
            self._data_ids[self._starts[first]:self._starts[stop]]
        view.row_offset = self.row_offset + self._starts[first]
        return view

    # ----------------------------------------------------------------------------- ranks
    def rank_status(self) -> dict[int, str]:
        """Per writing rank: "finalized" (its writer closed cleanly), "not finalized" (still
        logging, or stopped early: rows after its last completed shard are not stored) or "no
        index" (named in the manifest's `ranks` but it wrote nothing)."""
        expected = {int(r) for r in self.manifest.get("ranks", [])}
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
        return {r: sum(int(sh["rows"]) for sh in idx.get("shards", []))
                for r, idx in self._indexes.items()}

    @property
    def unfinalized_ranks(self) -> list[int]:
        """Ranks whose logging did not finish with `run.finalize()` (see `rank_status`)."""
        return [r for r, s in self.rank_status().items() if s != "finalized"]

    def missing_ids(self, expected) -> list[DataId]:
        """The ids of `expected` (ints or strings, in its order) that the selected segment
        lacks: what to log again after a rank stopped early."""
        if isinstance(expected, torch.Tensor):
            expected = expected.tolist()
        have = set(self.data_ids)
        return [i for i in expected if i not in have]

    # ----------------------------------------------------------------------------- integrity
    def check_unique_ids(self) -> None:
        """Raise if a data id appears twice in the selected segment (several ranks can only
        collide with each other: each writer checks its own ids)."""
        ids = self.data_ids
        if len(set(ids)) == len(ids):
            return
        where: dict[DataId, list[str]] = {}
        for i, sh in enumerate(self.shards):
            for d in self._layout(i)[1]:
                where.setdefault(d, []).append(f"rank {sh['rank']} ({sh['file']})")
        dups = [(d, w) for d, w in where.items() if len(w) > 1]
        listing = "; ".join(f"id {d!r} in {' and '.join(w)}" for d, w in dups[:5])
        raise StoreError(
            f"store {self.path}, segment {self.segment!r}: {len(dups)} data id(s) were logged "
            f"more than once across ranks: {listing}. Each rank must log a disjoint share of the "
            "data: torch's DistributedSampler repeats examples to even out the ranks unless "
            "drop_last=True, so pass drop_last=True (or log each id on one rank only). "
            "open_store(path, verify='none') opens the store without this check."
        )

    def verify(self, full: bool = True) -> None:
        """Check the selected segment's shards: existence and size; with `full` also crc32."""
        problems = []
        buf = bytearray(_CRC_BLOCK) if full else None
        for sh in self.shards:
            file = self.path / sh["file"]
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                problems.append(f"{sh['file']} is missing")
                continue
            if size != sh["bytes"]:
                kind = "truncated" if size < sh["bytes"] else "longer than recorded"
                problems.append(f"{sh['file']} is {kind}: {size} bytes on disk, the index "
                                f"records {sh['bytes']}")
                continue
            if full:
                crc = file_crc32(file, buf)
                if crc != sh["crc32"]:
                    problems.append(f"{sh['file']} is corrupted: crc32 {crc}, the index records "
                                    f"{sh['crc32']}")
        if problems:
            first = problems[0].split(" ", 1)[0]
            listing = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                                 if len(problems) > 5 else "")
            raise StoreError(
                f"store {self.path}, segment {self.segment!r}: {len(problems)} damaged "
                f"shard(s): {listing}. {_damage_fix(first)}"
            )

    # ----------------------------------------------------------------------------- rows
    def iter_chunks(self, rows: int = 4096, *, dtype: torch.dtype = torch.float32,
                    buffers: int = 0) -> Iterator[tuple[list[DataId], torch.Tensor]]:
        """Yield (ids, tensor [rows, D]) in row order; the last chunk may be smaller.

        buffers=0: each chunk is a fresh tensor (safe to keep). buffers=k >= 1: chunks cycle
        through k preallocated tensors, so a chunk stays valid only until k more chunks have been
        yielded (use k = prefetch depth + 2 behind a read-ahead thread). Reusing memory is
        several times faster on cached data (no page faults) and keeps the heap from growing.
        """
        if rows < 1 or buffers < 0:
            raise ValueError(f"rows per chunk must be >= 1 and buffers >= 0, got {rows}, {buffers}")
        n = len(self)
        if n == 0:
            return
        ids = self.data_ids
        reader = _RowReader(self)
        pool: list[torch.Tensor] = []
        try:
            reader.advise(0, min(rows, n))
            for start in range(0, n, rows):
                k = min(rows, n - start)
                if buffers > 0:
                    slot = (start // rows) % buffers
                    if len(pool) <= slot:
                        pool.append(torch.empty((min(rows, n), self.width), dtype=dtype))
                    out = pool[slot][:k]
                else:
                    out = torch.empty((k, self.width), dtype=dtype)
                reader.read_into(out, start)
                reader.advise(start + k, min(rows, n - start - k))  # kernel reads ahead meanwhile
                yield ids[start:start + k], out
        finally:
            reader.close()

    def load(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows of the selected segment as one tensor [N, D] (for stores that fit in RAM)."""
        n = len(self)
        out = torch.empty((n, self.width), dtype=dtype)
        if n:
            reader = _RowReader(self)
            try:
                reader.read_into(out, 0)
            finally:
                reader.close()
        return out


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _RowReader:
    """Reads global row ranges of a Store's segment straight into tensors via pread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.storage = TORCH_DTYPES[store.dtype]
        self.row_bytes = store.width * SAFETENSORS_DTYPES[store.dtype][1]
        self.fds: dict[int, int] = {}
        self.staging: torch.Tensor | None = None

    def _fd(self, i: int) -> int:
        if i not in self.fds:
            for j in [j for j in self.fds if j < i - 1]:  # shards are read in order
                os.close(self.fds.pop(j))
            sh = self.store.shards[i]
            try:
                fd = os.open(self.store.path / sh["file"], os.O_RDONLY)
            except FileNotFoundError:
                raise StoreError(f"shard {sh['file']} is missing. {_damage_fix(sh['file'])}")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self.fds[i] = fd
        return self.fds[i]

    def _pieces(self, start: int, k: int) -> Iterator[tuple[int, int, int, int]]:
        """(shard index, position in the request, rows, file offset) covering [start, start+k)."""
        starts = self.store._starts
        pos = 0
        while pos < k:
            i = bisect.bisect_right(starts, start + pos) - 1
            local = start + pos - starts[i]
            take = min(k - pos, starts[i + 1] - starts[i] - local)
            yield i, pos, take, self.store._layout(i)[0] + local * self.row_bytes
            pos += take

    def advise(self, start: int, k: int) -> None:
        """Ask the kernel to start reading rows [start, start+k) in the background."""
        if k <= 0 or not hasattr(os, "posix_fadvise"):
            return
        for i, _, take, offset in self._pieces(start, k):
            os.posix_fadvise(self._fd(i), offset, take * self.row_bytes, os.POSIX_FADV_WILLNEED)

    def read_into(self, out: torch.Tensor, start: int) -> None:
        """Fill out [k, D] with rows [start, start+k), converting from the storage dtype."""
        direct = out.dtype == self.storage
        for i, pos, take, offset in self._pieces(start, out.shape[0]):
            if direct:
                target = out[pos:pos + take]
            else:
                if self.staging is None or self.staging.shape[0] < take:
                    self.staging = torch.empty((take, self.store.width), dtype=self.storage)
                target = self.staging[:take]
            self._pread(i, _bytes_of(target), offset)
            if not direct:
                out[pos:pos + take].copy_(target)

    def _pread(self, i: int, buf: memoryview, offset: int) -> None:
        fd = self._fd(i)
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                rel = self.store.shards[i]["file"]
                raise StoreError(f"shard {rel} ends early (truncated at byte {offset + done}). "
                                 f"{_damage_fix(rel)}")
            done += n

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
