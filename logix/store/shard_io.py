"""Row I/O of shard files: write one `rows [n, D]` safetensors file straight from memory, and
read global row ranges of a segment straight into tensors with `pread` (no serialised copy)."""

from __future__ import annotations

import bisect
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from logix.errors import StoreError
from logix.store.format import SAFETENSORS_DTYPES, SHARD_FORMAT, shard_relpath, write_atomic

# Storage dtype names (the manifest's "dtype") -> torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def nonfinite_rows(rows: torch.Tensor) -> list[int]:
    """Indices of rows [B, D] holding a NaN or inf, found with one reduction pass: a non-finite
    entry makes its row sum non-finite (finite rows overflow only with |values| ~ 1e34)."""
    bad = ~torch.isfinite(rows.sum(dim=1, dtype=torch.float32))
    return bad.nonzero().flatten().tolist() if bool(bad.any()) else []


def write_shard_file(path: Path, name: str, rows: torch.Tensor, width: int, dtype: str,
                     metadata: dict[str, str]) -> tuple[int, str]:
    """Write one tensor [n, width] to a safetensors file and return (file size, crc32 of its
    bytes); the checksum is taken block by block while the block is still in the CPU cache."""
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
        step = 4 << 20
        for start in range(0, len(view), step):
            block = view[start:start + step]
            crc = zlib.crc32(block, crc)
            f.write(block)
    return len(head) + n * width * itemsize, f"{crc & 0xFFFFFFFF:08x}"


def write_shard(run_dir: Path, segment: str, rank: int, seq: int, ids: list, rows: torch.Tensor,
                width: int, dtype: str) -> dict:
    """Write rows [n, width] (float32) of `segment` as shard `seq` of `rank`, converted to the
    storage dtype, under a temporary name renamed when complete; returns its index entry."""
    if dtype != "float32":
        rows = rows.to(TORCH_DTYPES[dtype])
        bad = [ids[j] for j in nonfinite_rows(rows)]
        if bad:
            raise StoreError(f"rows of data id(s) {bad[:10]} overflow {dtype}: "
                             "use store dtype bfloat16 or float32")
    rel = shard_relpath(segment, rank, seq)
    metadata = {"format": SHARD_FORMAT, "segment": segment, "rank": str(rank),
                "data_ids": json.dumps(ids)}
    final = Path(run_dir) / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        written["bytes"], written["crc32"] = write_shard_file(tmp, "rows", rows, width, dtype, metadata)

    write_atomic(final, write)
    return {"file": rel, "segment": segment, "seq": seq, "rows": len(ids),
            "bytes": written["bytes"], "crc32": written["crc32"]}


def damage_fix(rel: str) -> str:
    """What to do about a damaged or missing shard `rel` (the end of every such error)."""
    return (
        f"Nothing was changed on disk. Restore {rel} from a backup if you have one, or log the "
        "rows of that shard again (e.g. into a new run or segment); open_store(path, "
        "verify='none') opens the store anyway, but reading that shard will fail."
    )


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class RowReader:
    """Reads global row ranges of a Store's segment straight into tensors via pread.

    `store` gives `path`, `shards` (dicts with "file"), `width`, `dtype`, `starts` (row index
    of each shard's first row, plus the total) and `shard_offset(i)` (file offset of row 0)."""

    def __init__(self, store: Any) -> None:
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
                raise StoreError(f"shard {sh['file']} is missing. {damage_fix(sh['file'])}") from None
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self.fds[i] = fd
        return self.fds[i]

    def _pieces(self, start: int, k: int) -> Iterator[tuple[int, int, int, int]]:
        """(shard index, position in the request, rows, file offset) covering [start, start+k)."""
        starts = self.store.starts
        pos = 0
        while pos < k:
            i = bisect.bisect_right(starts, start + pos) - 1
            local = start + pos - starts[i]
            take = min(k - pos, starts[i + 1] - starts[i] - local)
            yield i, pos, take, self.store.shard_offset(i) + local * self.row_bytes
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
                                 f"{damage_fix(rel)}")
            done += n

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
