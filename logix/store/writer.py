"""`StoreWriter`: append rows of projected gradients to a store, off the training thread.

The caller hands over batches of rows `[B, D]` with their data ids; the writer checks them, keeps
them in a pending buffer, cuts full shards of `shard_rows` rows and queues them for one
background thread. That thread calls the observers (curvature statistics), serialises the shard,
writes it under a temporary name, renames it and then replaces the rank's index atomically, so a
crash at any point leaves every completed shard readable and nothing half-written (DESIGN §2).
"""

from __future__ import annotations

import copy
import json
import queue
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from logix.store.format import (
    FORMAT_NAME,
    MANIFEST,
    SAFETENSORS_DTYPES,
    SHARD_DIR,
    SHARD_FORMAT,
    STORAGE_DTYPES,
    StoreError,
    check_segment_name,
    file_crc32,
    index_path,
    read_json,
    shard_layout,
    shard_relpath,
    write_atomic,
    write_json_atomic,
)
from logix.store.reader import TORCH_DTYPES

DataId = int | str
Observer = Callable[[str, torch.Tensor], None]
_STOP = object()


def normalise_ids(ids: Sequence[Any]) -> list[DataId]:
    """Data ids as python ints or strs; numpy / 0-d torch integers become int."""
    if isinstance(ids, (str, bytes)):
        raise StoreError(f"data ids must be a sequence of ids, got the single string {ids!r}")
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist() if ids.ndim else [ids.item()]
    kinds = set(map(type, ids))
    if kinds == {int} or kinds == {str}:  # the common case, without a check per id
        return list(ids)
    out: list[DataId] = []
    for i in ids:
        if isinstance(i, torch.Tensor) and i.ndim == 0 and not i.is_floating_point() \
                and i.dtype != torch.bool:
            i = int(i.item())
        elif isinstance(i, np.integer):
            i = int(i)
        elif isinstance(i, str):
            i = str(i)  # np.str_ -> str
        if isinstance(i, bool) or not isinstance(i, (int, str)):
            raise StoreError(
                f"data id {i!r} ({type(i).__name__}) is not valid: use ints or strings"
            )
        out.append(i)
    return out


def batch_ids(data_id: Any) -> list[DataId]:
    """The ids of one batch: a single int or str is a batch of one; never empty."""
    if isinstance(data_id, (int, str)) and not isinstance(data_id, bool):
        data_id = [data_id]
    ids = normalise_ids(data_id)
    if not ids:
        raise ValueError("data_id is empty: pass one id per example of the batch")
    return ids


def nonfinite_rows(rows: torch.Tensor) -> list[int]:
    """Indices of rows [B, D] holding a NaN or inf, found with one reduction pass: a non-finite
    entry makes its row sum non-finite (finite rows overflow only with |values| ~ 1e34)."""
    bad = ~torch.isfinite(rows.sum(dim=1, dtype=torch.float32))
    return bad.nonzero().flatten().tolist() if bool(bad.any()) else []


def _write_safetensors(path: Path, name: str, rows: torch.Tensor, width: int, dtype: str,
                       metadata: dict[str, str]) -> tuple[int, str]:
    """Write one tensor [n, width] to a safetensors file straight from memory (no serialised
    copy) and return (file size, crc32 of its bytes)."""
    code, itemsize = SAFETENSORS_DTYPES[dtype]
    n = rows.shape[0]
    header = {"__metadata__": metadata,
              name: {"dtype": code, "shape": [n, width], "data_offsets": [0, n * width * itemsize]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
    head = len(raw).to_bytes(8, "little") + raw
    crc = zlib.crc32(head)
    with open(path, "wb") as f:
        f.write(head)
        view = memoryview(rows.contiguous().view(torch.uint8).numpy()).cast("B")  # raw bytes
        step = 4 << 20  # checksum each block while it is still in the CPU cache, then write it
        for start in range(0, len(view), step):
            block = view[start:start + step]
            crc = zlib.crc32(block, crc)
            f.write(block)
    return len(head) + n * width * itemsize, f"{crc & 0xFFFFFFFF:08x}"


class StoreWriter:
    """Writes one rank's shards and index into an existing store directory.

    Use `add(ids, rows)` from the training loop, `start_segment()` between checkpoints or stages,
    and `close()` (or a `with` block) at the end. Errors of the background thread are raised by
    the next `add` / `flush` / `close`.
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
        manifest_file = self.run_dir / MANIFEST
        if not manifest_file.is_file():
            raise StoreError(
                f"{manifest_file} does not exist: create the store first (logix.init writes the "
                "manifest and projections before any rows are logged)"
            )
        manifest = read_json(manifest_file)
        if manifest.get("format") != FORMAT_NAME:
            raise StoreError(f"{manifest_file} is not a logix store manifest")
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
        # Rows are gathered in float32 shard buffers that are reused: no allocation (and no page
        # faults) per step. A shard holds at most `max_shard_bytes` of them, so the buffers
        # (one filling, the others queued or being written) stay small for wide rows.
        self.shard_rows = max(1, min(int(shard_rows), int(max_shard_bytes) // (4 * self.width)))
        self.observers = list(observers)

        self._lock = threading.Lock()  # guards self._index (caller mutates segments, thread shards)
        self._index_file = index_path(self.run_dir, self.rank)
        self._index_file.parent.mkdir(parents=True, exist_ok=True)
        (self.run_dir / SHARD_DIR).mkdir(exist_ok=True)
        self._remove_tmp_files()
        if self._index_file.is_file():
            self._index = read_json(self._index_file)
        else:
            self._index = {"rank": self.rank, "segments": [], "shards": [], "next_seq": 0}
        self._others = self._read_other_indexes()
        self._adopt_orphans()
        # "finalized" turns true when this writer closes cleanly: a reader tells a rank that
        # stopped early (killed, crashed) from one that finished.
        self._index["finalized"] = False
        write_json_atomic(self._index_file, self._index)

        own = [s["name"] for s in self._index["segments"]]
        others = [s["name"] for idx in self._others for s in idx.get("segments", [])]
        self._segment: str | None = (own or others or [None])[-1]
        self._ids: dict[str, set[DataId]] = {}  # segment -> ids known to be taken
        self._buf: torch.Tensor | None = None  # the shard being filled, [shard_rows, D] float32
        self._buf_ids: list[DataId] = []
        self._free: queue.Queue = queue.Queue()  # shard buffers the thread has finished with
        self._buffers = 0
        self._max_buffers = min(queue_depth, 2) + 1
        self._error: BaseException | None = None
        self._closed = False
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._thread = threading.Thread(target=self._work, name=f"logix-writer-{rank}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- opening
    def _remove_tmp_files(self) -> None:
        """Temporary files of this rank are leftovers of a crash: never complete, never listed."""
        pattern = f"*/.r{self.rank:05d}-*.safetensors.tmp*"
        leftovers = list((self.run_dir / SHARD_DIR).glob(pattern))
        leftovers += list(self._index_file.parent.glob(f".{self._index_file.name}.tmp*"))
        for p in leftovers:
            p.unlink(missing_ok=True)

    def _read_other_indexes(self) -> list[dict]:
        out = []
        for p in sorted(self._index_file.parent.glob("rank-*.json")):
            if p != self._index_file:
                out.append(read_json(p))
        return out

    def _adopt_orphans(self) -> bool:
        """Add completed shards of this rank that the index misses (kill after rename)."""
        listed = {s["file"] for s in self._index["shards"]}
        pattern = f"*/r{self.rank:05d}-*.safetensors"
        found = sorted((self.run_dir / SHARD_DIR).glob(pattern))
        max_seq = max([s["seq"] for s in self._index["shards"]], default=-1)
        adopted = False
        for path in found:
            rel = path.relative_to(self.run_dir).as_posix()
            seq = int(path.stem.split("-")[1])
            max_seq = max(max_seq, seq)
            if rel in listed:
                continue
            try:
                rows, _, meta = shard_layout(path, self.width, self.dtype)
                ids = json.loads(meta["data_ids"])
                segment = meta["segment"]
                if len(ids) != rows or path.parent.name != segment:
                    raise StoreError(f"{path}: {len(ids)} ids for {rows} rows")
            except (StoreError, KeyError, ValueError) as e:
                warnings.warn(
                    f"{path} is not listed in {self._index_file.name} and cannot be adopted "
                    f"({e}); it is left in place and ignored (move it away to silence this)",
                    stacklevel=3,
                )
                continue
            self._index["shards"].append({
                "file": rel, "segment": segment, "seq": seq, "rows": rows,
                "bytes": path.stat().st_size, "crc32": file_crc32(path),
            })
            if segment not in [s["name"] for s in self._index["segments"]]:
                self._index["segments"].append({"name": segment, "meta": {}})
            warnings.warn(
                f"adopted {rel} ({rows} rows): it was completely written but missing from the "
                "index (the previous writer stopped between writing it and updating the index)",
                stacklevel=3,
            )
            adopted = True
        self._index["shards"].sort(key=lambda s: s["seq"])
        self._index["next_seq"] = max(self._index.get("next_seq", 0), max_seq + 1)
        return adopted

    def _known_ids(self, segment: str) -> set[DataId]:
        """Ids already taken in `segment`: all ranks' shards at open time plus our own adds."""
        if segment not in self._ids:
            taken: set[DataId] = set()
            with self._lock:
                shards = [s for s in self._index["shards"] if s["segment"] == segment]
            for idx in self._others:
                shards += [s for s in idx.get("shards", []) if s["segment"] == segment]
            for s in shards:
                try:
                    _, _, meta = shard_layout(self.run_dir / s["file"], self.width, self.dtype)
                    taken.update(json.loads(meta["data_ids"]))
                except (OSError, KeyError, ValueError) as e:
                    raise StoreError(
                        f"cannot read the data ids of {s['file']} to check for duplicates ({e}); "
                        f"check the store with `logix inspect {self.run_dir}`"
                    ) from e
            self._ids[segment] = taken
        return self._ids[segment]

    # ----------------------------------------------------------------------------- segments
    @property
    def segment(self) -> str | None:
        """The segment that `add` appends to (None until the first segment exists)."""
        return self._segment

    def segment_names(self) -> list[str]:
        """The names of every segment of the store (this rank's and the others')."""
        return list(dict.fromkeys(self._all_segment_names()))

    def _all_segment_names(self) -> list[str]:
        with self._lock:
            names = [s["name"] for s in self._index["segments"]]
        return names + [s["name"] for idx in self._others for s in idx.get("segments", [])]

    def start_segment(self, name: str | None = None, meta: dict | None = None) -> str:
        """Flush the current segment's rows and make `name` current (default: next number)."""
        self._check_usable()
        if name is None:
            name = self._next_segment_name()
        check_segment_name(name)
        if meta is not None:
            json.dumps(meta)  # fail here, not in the background thread
        self._cut()
        with self._lock:
            entry = self._segment_entry(name)
            entry["meta"].update(meta or {})
        self._segment = name
        self._put(("index",))
        return name

    def update_segment_meta(self, meta: dict) -> None:
        """Merge `meta` (JSON-able) into the current segment's meta and persist it."""
        self._check_usable()
        json.dumps(meta)
        if self._segment is None:
            self.start_segment(meta=meta)
            return
        with self._lock:
            self._segment_entry(self._segment)["meta"].update(meta)
        self._put(("index",))

    def segment_meta(self, name: str) -> dict:
        """A copy of segment `name`'s meta as this rank's index holds it ({} if unknown)."""
        with self._lock:
            for s in self._index["segments"]:
                if s["name"] == name:
                    return dict(s["meta"])
        return {}

    def _segment_entry(self, name: str) -> dict:
        """The index entry of segment `name`, created if needed (caller holds the lock)."""
        for s in self._index["segments"]:
            if s["name"] == name:
                return s
        entry = {"name": name, "meta": {}}
        self._index["segments"].append(entry)
        return entry

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
        segment = self._segment if self._segment is not None else self._next_segment_name()
        taken = self._known_ids(segment)
        seen: set[DataId] = set()
        dups = []
        for i in ids:
            if i in seen or i in taken:
                dups.append(i)
            seen.add(i)
        if dups:
            raise StoreError(
                f"duplicate data id(s) {sorted(set(dups), key=str)[:10]} in segment {segment!r}: "
                "ids must be unique within a segment (start a new segment to log the data again)"
            )
        bad = [ids[j] for j in nonfinite_rows(rows)]
        if bad:
            raise StoreError(
                f"non-finite gradient rows (NaN/inf) for data id(s) {bad[:10]}: check the loss "
                "of these examples; nothing of this batch was stored"
            )
        self._raise_error()
        if self._segment is None:
            self.start_segment(segment)
        taken.update(ids)
        rows = rows.detach()
        done = 0
        while done < len(ids):
            if self._buf is None:
                self._buf = self._take_buffer()
            start = len(self._buf_ids)
            take = min(self.shard_rows - start, len(ids) - done)
            target = self._buf[start:start + take]
            if target.data_ptr() != rows[done:].data_ptr():  # rows from reserve() are in place
                target.copy_(rows[done:done + take])
            self._buf_ids += ids[done:done + take]
            done += take
            if len(self._buf_ids) == self.shard_rows:
                self._cut()

    def reserve(self, n: int) -> torch.Tensor:
        """A [n, D] float32 CPU tensor to fill and pass to `add`: a slice of the current shard
        buffer when the rows fit in it (then `add` copies nothing), else a new tensor."""
        if self._buf is None and not self._closed and self._error is None:
            self._buf = self._take_buffer()
        start = len(self._buf_ids)
        if self._buf is not None and start + n <= self.shard_rows:
            return self._buf[start:start + n]
        return torch.empty(n, self.width)

    def _take_buffer(self) -> torch.Tensor:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._buffers < self._max_buffers:
            self._buffers += 1
            return torch.empty(self.shard_rows, self.width)
        while True:  # back-pressure: wait for the thread to finish a shard
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                self._raise_error()

    def _next_segment_name(self) -> str:
        """The next unused number among all ranks' segment names."""
        numbers = [int(n) for n in self._all_segment_names() if n.isdigit()]
        return str(max(numbers, default=-1) + 1)

    def _cut(self) -> None:
        """Queue the current shard buffer (full, or partial at a flush) for writing."""
        if self._buf is None or not self._buf_ids:
            return
        self._put(("shard", self._segment, self._buf_ids, self._buf))
        self._buf, self._buf_ids = None, []

    def flush(self) -> None:
        """Write the pending rows as a (possibly smaller) shard and wait until all are on disk."""
        self._check_open()
        self._raise_error()
        self._cut()
        self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Flush, stop the background thread and mark this rank's index finalized; idempotent."""
        if self._closed:
            return
        try:
            if self._error is None:
                self._cut()
        finally:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_error()
        with self._lock:
            self._index["finalized"] = True
        self._write_index()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except StoreError as e:  # keep the original exception; still say what was lost
            warnings.warn(f"closing the store writer failed too: {e}", stacklevel=2)

    def logged_ids(self, segment: str | None = None) -> set[DataId]:
        """Ids in `segment` (default: current): on disk at open time plus all added since."""
        segment = segment if segment is not None else self._segment
        if segment is None:
            return set()
        return set(self._known_ids(segment))

    # ----------------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store writer is closed")

    def _check_usable(self) -> None:
        self._check_open()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise StoreError(
                f"background writer failed: {self._error!r}; rows added since the last "
                f"completed shard are not stored (ids on disk: open_store({str(self.run_dir)!r}))"
            ) from self._error

    def _put(self, job: tuple) -> None:
        self._queue.put(job)  # blocks when `queue_depth` jobs wait: back-pressure on a slow disk

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if self._error is None:  # after an error, drain jobs without writing
                    if job[0] == "shard":
                        self._write_shard(*job[1:])
                    else:
                        self._write_index()
            except BaseException as e:  # noqa: BLE001 - surfaced on the caller's thread
                self._error = e
            finally:
                self._queue.task_done()

    def _write_index(self) -> None:
        with self._lock:
            snapshot = copy.deepcopy(self._index)
        write_json_atomic(self._index_file, snapshot)

    def _write_shard(self, segment: str, ids: list[DataId], buffer: torch.Tensor) -> None:
        try:
            self._write_rows(segment, ids, buffer[:len(ids)])
        finally:
            self._free.put(buffer)

    def _write_rows(self, segment: str, ids: list[DataId], rows: torch.Tensor) -> None:
        for fn in self.observers:
            fn(segment, rows)
        if self.dtype != "float32":
            rows = rows.to(TORCH_DTYPES[self.dtype])
            bad = [ids[j] for j in nonfinite_rows(rows)]
            if bad:
                raise StoreError(
                    f"rows of data id(s) {bad[:10]} overflow {self.dtype}: "
                    "use store dtype bfloat16 or float32"
                )
        with self._lock:
            seq = self._index["next_seq"]
        rel = shard_relpath(segment, self.rank, seq)
        metadata = {"format": SHARD_FORMAT, "segment": segment, "rank": str(self.rank),
                    "data_ids": json.dumps(ids)}
        final = self.run_dir / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        written: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            written["bytes"], written["crc32"] = _write_safetensors(
                tmp, "rows", rows, self.width, self.dtype, metadata)

        write_atomic(final, write)
        nbytes, crc = written["bytes"], written["crc32"]
        with self._lock:
            self._index["shards"].append({
                "file": rel, "segment": segment, "seq": seq, "rows": len(ids),
                "bytes": nbytes, "crc32": crc,
            })
            self._index["next_seq"] = seq + 1
            self._segment_entry(segment)
        self._write_index()
