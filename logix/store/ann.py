"""The on-disk form of an approximate (FAISS) index of a store's rows, and the store content it
is keyed to. No faiss here: only names, keys and checksums, so that the store can list them.

    RUN_DIR/ann/<segment>/<metric>.json                 the record: the commit point of a build
    RUN_DIR/ann/<segment>/<metric>-<sha16>.faiss        faiss's own serialization (not pickle)

A build writes the faiss file under a temporary name, renames it to a name carrying the first
16 hex digits of its sha256, then replaces the record (atomically); older faiss files of the
same metric are removed after that. A crash at any point leaves the previous record and its
file, or the new ones: never a record naming a file that is not the one it describes. The
record holds the full sha256 of the faiss file (checked before faiss reads it) and the
`content_key` of the store it was built from: the projections' fingerprint, the segment, the
row width and dtype, and every shard's file, rows, bytes and crc32. Logging more rows (a new
shard), re-logging into a recreated store (other checksums) or other projections all change
the key, so a stale index is refused, never used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from logix.errors import StoreError
from logix.store.format import read_tagged_json, write_json_atomic

ANN_DIR = "ann"
ANN_FORMAT = "logix-ann-index"
ANN_VERSION = 1


def ann_dir(run_dir: Path, segment: str) -> Path:
    """Where the approximate indexes of one segment live."""
    return Path(run_dir) / ANN_DIR / segment


def record_path(run_dir: Path, segment: str, metric: str) -> Path:
    """The record (JSON) of the `metric` index of a segment."""
    return ann_dir(run_dir, segment) / f"{metric}.json"


def content_key(store: Any) -> str:
    """sha256 hex of what a store's rows are: fingerprint (module table and projection
    matrices), segment, width, dtype and each listed shard's file, rows, bytes and crc32."""
    shards = [[sh["file"], int(sh["rows"]), int(sh["bytes"]), sh.get("crc32")] for sh in store.shards]
    described = {
        "fingerprint": store.fingerprint,
        "segment": store.segment,
        "width": int(store.width),
        "dtype": store.dtype,
        "shards": shards,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path, piece: int = 16 << 20) -> str:
    """sha256 hex of a file's bytes, read in pieces (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(piece):
            h.update(chunk)
    return h.hexdigest()


def write_record(run_dir: Path, segment: str, metric: str, record: dict) -> Path:
    """Commit a build: replace the record atomically, then remove the metric's other faiss
    files (left by earlier builds). record["file"] is the faiss file's name in the same folder."""
    path = record_path(run_dir, segment, metric)
    write_json_atomic(path, {"format": ANN_FORMAT, "version": ANN_VERSION, **record})
    for old in path.parent.glob(f"{metric}-*.faiss"):
        if old.name != record["file"]:
            old.unlink(missing_ok=True)
    return path


def read_record(run_dir: Path, segment: str, metric: str) -> dict | None:
    """The record of the `metric` index of a segment, None when there is none; a damaged or
    foreign record is a StoreError naming the rebuild."""
    path = record_path(run_dir, segment, metric)
    if not path.is_file():
        return None
    record = read_tagged_json(path, ANN_FORMAT, ANN_VERSION, "index record", rebuild_fix(run_dir))
    name = record.get("file")
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".faiss"):
        raise StoreError(f"{path} names no index file inside its folder; {rebuild_fix(run_dir)}")
    return record


def checked_file(run_dir: Path, segment: str, record: dict) -> Path:
    """The faiss file a record names, after checking its size and sha256 against the record
    (a StoreError naming the rebuild when it is missing or differs)."""
    path = ann_dir(run_dir, segment) / record["file"]
    if not path.is_file():
        raise StoreError(f"the index file {path} is missing; {rebuild_fix(run_dir)}")
    if path.stat().st_size != record.get("bytes") or file_sha256(path) != record.get("sha256"):
        raise StoreError(
            f"the index file {path} does not match its record (size or sha256 differ: it is "
            f"damaged or was replaced); {rebuild_fix(run_dir)}"
        )
    return path


def rebuild_fix(run_dir: Path) -> str:
    return f"rebuild it with `logix index {run_dir} --build` (or logix.build_index(store))"
