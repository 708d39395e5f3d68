"""Caches of derived curvature (eigendecompositions, streaming recomputes) that work on
read-only stores too.

A cache is a tagged safetensors file beside the statistics it came from, carrying a checksum of
its tensors and the key of the content it was derived from (`rows_key` of the rows, digests of
the statistics); a damaged or mismatching cache is recomputed, never trusted. Where the store's
directory cannot be written (read-only media, another user's store), caches go to
`$LOGIX_CACHE_DIR` when it is set, else stay in this process's memory; a one-line notice says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from logix.errors import StoreError
from logix.notices import warn
from logix.store.format import write_atomic
from logix.store.paths import checked_file
from logix.store.tagged import CHECKSUM_KEY, checksum_matches, read_tagged, tensors_checksum

CACHE_DIR_ENV = "LOGIX_CACHE_DIR"
_MEMORY: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
_NOTICED: set[str] = set()


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def rows_key(store: Any) -> str:
    """A content key of a store segment's rows (a `Store`): the projections' fingerprint, row
    format, segment and every shard's (rank, seq, rows, crc32) from the index, in row order. The
    crc32 covers a shard's whole file (rows and ids), so rows re-logged with other weights, a
    replaced store or another store with the same ids all give another key; nothing is read."""
    shards = [[sh.get("rank"), sh.get("seq"), sh.get("rows"), sh.get("crc32")] for sh in store.shards]
    text = json.dumps([store.fingerprint, store.dtype, store.width, store.segment, shards], default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def user_cache_path(path: Path) -> Path | None:
    """Where the cache `path` of a read-only store goes under `$LOGIX_CACHE_DIR` (None if unset)."""
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        return None
    where = hashlib.sha256(_key(Path(path).parent).encode()).hexdigest()[:16]
    return Path(root) / where / Path(path).name


def save_cache(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Keep a cache: at `path` if its directory is writable, else under `$LOGIX_CACHE_DIR`,
    else in memory (with a one-line notice, once per directory)."""
    path = checked_file(path)  # no link (its directory is checked by curvature_dir)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {**metadata, CHECKSUM_KEY: tensors_checksum(tensors)}
    data = save(tensors, metadata=metadata)
    _MEMORY.pop(_key(path), None)
    for target in (path, user_cache_path(path)):
        if target is None:
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, lambda tmp: tmp.write_bytes(data))
            if target != path:
                _notice(path, f"kept in {target.parent} (${CACHE_DIR_ENV})")
            return
        except OSError:
            continue
    _MEMORY[_key(path)] = (tensors, metadata)
    _notice(path, f"kept in memory for this process (set ${CACHE_DIR_ENV} to keep them on disk)")


def _notice(path: Path, where: str) -> None:
    directory = _key(path.parent)
    if directory not in _NOTICED:
        _NOTICED.add(directory)
        warn(f"logix: {path.parent} is not writable; curvature caches are {where}")


def load_cache(
    path: Path, formats: str | tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of the cache `path` from memory, the store or `$LOGIX_CACHE_DIR`;
    None when there is none, or it is damaged, foreign or fails its checksum (recompute)."""
    path = checked_file(path)
    if _key(path) in _MEMORY:
        return _MEMORY[_key(path)]
    for source in (path, user_cache_path(path)):
        if source is None or not source.is_file():
            continue
        try:
            tensors, md = read_tagged(source, formats, "a logix cache")
        except (StoreError, OSError):
            continue
        if checksum_matches(tensors, md):
            return tensors, md
    return None
