"""Shard files: write one `rows [n, D]` safetensors file straight from memory (reading them back
is `row_reader.RowReader`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from logix.errors import StoreError
from logix.store.checksum import checksum_update, hex32, writing_checksum
from logix.store.format import SAFETENSORS_DTYPES, SHARD_FORMAT, shard_file, shard_relpath, write_atomic

# Storage dtype names (the manifest's "dtype") -> torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def nonfinite_rows(rows: torch.Tensor) -> list[int]:
    """Indices of rows [B, D] holding a NaN or inf, found with one reduction pass: a non-finite
    entry makes its row sum non-finite (finite rows overflow only with |values| ~ 1e34)."""
    sums = rows.sum(dim=1, dtype=torch.float32)
    if math.isfinite(float(sums.sum())):  # the common case: one scalar (a finite total of the
        return []  # row sums means every row sum is finite; an overflowing total looks closer)
    bad = ~torch.isfinite(sums)
    return bad.nonzero().flatten().tolist()


def overflow_error(bad: list, dtype: str) -> StoreError:
    """The error for rows (of data ids `bad`) that are finite in float32 but not in `dtype`."""
    return StoreError(
        f"rows of data id(s) {bad[:10]} overflow {dtype}: use store dtype bfloat16 or float32; "
        "nothing of this batch was stored"
    )


def write_shard_file(
    path: Path,
    name: str,
    rows: torch.Tensor,
    width: int,
    dtype: str,
    metadata: dict[str, str],
    checksum: str = "crc32",
) -> tuple[int, str]:
    """Write one tensor [n, width] to a safetensors file and return (file size, `checksum` of
    its bytes, see store/checksum.py); the checksum is taken block by block while the block is
    still in the CPU cache."""
    update = checksum_update(checksum)
    code, itemsize = SAFETENSORS_DTYPES[dtype]
    n = rows.shape[0]
    header = {
        "__metadata__": metadata,
        name: {"dtype": code, "shape": [n, width], "data_offsets": [0, n * width * itemsize]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
    head = len(raw).to_bytes(8, "little") + raw
    crc = update(head, 0)
    with open(path, "wb") as f:
        f.write(head)
        view = memoryview(rows.contiguous().view(torch.uint8).numpy()).cast("B")  # raw bytes
        step = 4 << 20
        for start in range(0, len(view), step):
            block = view[start : start + step]
            crc = update(block, crc)
            f.write(block)
    return len(head) + n * width * itemsize, hex32(crc)


def write_shard(
    run_dir: Path, segment: str, rank: int, seq: int, ids: list, rows: torch.Tensor, width: int, dtype: str
) -> dict:
    """Write rows [n, width] (in the storage dtype, or float32 converted here) of `segment` as
    shard `seq` of `rank`, under a temporary name renamed when complete; returns its index entry."""
    if rows.dtype != TORCH_DTYPES[dtype]:  # float32 rows kept for the writer's observers
        rows = rows.to(TORCH_DTYPES[dtype])
        bad = [ids[j] for j in nonfinite_rows(rows)]
        if bad:
            raise overflow_error(bad, dtype)
    rel = shard_relpath(segment, rank, seq)
    metadata = {"format": SHARD_FORMAT, "segment": segment, "rank": str(rank), "data_ids": json.dumps(ids)}
    final = shard_file(run_dir, rel)
    final.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    checksum = writing_checksum()

    def write(tmp: Path) -> None:
        size, digits = write_shard_file(tmp, "rows", rows, width, dtype, metadata, checksum)
        written["bytes"], written["crc32"] = size, digits

    write_atomic(final, write)
    entry = {
        "file": rel,
        "segment": segment,
        "seq": seq,
        "rows": len(ids),
        "bytes": written["bytes"],
        "crc32": written["crc32"],
    }
    if checksum != "crc32":  # an entry without the field is zlib CRC-32, as in older stores
        entry["checksum"] = checksum
    return entry


def damage_fix(rel: str) -> str:
    """What to do about a damaged or missing shard `rel` (the end of every such error)."""
    return (
        f"Nothing was changed on disk. Restore {rel} from a backup if you have one, or log the "
        "rows of that shard again (e.g. into a new run or segment); open_store(path, "
        "verify='none') opens the store anyway, but reading that shard will fail."
    )
