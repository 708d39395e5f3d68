"""After a crash: temporary files left behind, and complete shards that no index lists.

A shard is renamed into place before its rank's index is replaced, so a kill between the two
leaves a complete shard that the index misses. Readers include such shards (and say so); a
resumed writer adopts them into its index. Each one is checked first: its header must match
the store's width and dtype, and its segment and rank those of its path.
"""

from __future__ import annotations

import re
from pathlib import Path

from logix.errors import StoreError
from logix.notices import warn
from logix.store.checksum import file_checksum, writing_checksum
from logix.store.format import INDEX_DIR, SHARD_DIR, shard_layout
from logix.store.ids import stored_ids
from logix.store.paths import glob_inside

_SHARD_NAME = re.compile(r"^r(\d{5})-(\d{6})\.safetensors$")


def remove_tmp_files(run_dir: Path, rank: int) -> None:
    """Delete rank `rank`'s temporary shard and index files: leftovers of a writer that is gone
    (call it only while holding the rank's writer lock, so no live writer owns them)."""
    run_dir = Path(run_dir)
    leftovers = list(glob_inside(run_dir, SHARD_DIR, f"*/.r{rank:05d}-*.safetensors.tmp*"))
    leftovers += list(glob_inside(run_dir, INDEX_DIR, f".rank-{rank:05d}.json.tmp*"))
    for p in leftovers:
        p.unlink(missing_ok=True)


def unindexed_shards(
    run_dir: Path,
    indexes: dict[int, dict],
    width: int,
    dtype: str,
    rank: int | None = None,
    checksum: bool = False,
) -> list[dict]:
    """Complete shard files (of `rank`, or of every rank) that no index lists, as index entries
    with "rank", "data_ids" and "unindexed": True; `checksum` computes their checksum (else
    None) with the algorithm new shards use. A file that fails the checks is left in place with
    a warning."""
    run_dir = Path(run_dir)
    algorithm = writing_checksum()
    listed = {sh["file"] for idx in indexes.values() for sh in idx.get("shards", [])}
    found = []
    for path in glob_inside(run_dir, SHARD_DIR, "*/r*.safetensors"):
        match = _SHARD_NAME.match(path.name)
        rel = path.relative_to(run_dir).as_posix()
        if match is None or rel in listed or not path.is_file():
            continue
        shard_rank, seq = int(match.group(1)), int(match.group(2))
        if rank is not None and shard_rank != rank:
            continue
        try:
            rows, _, meta = shard_layout(path, width, dtype)
            ids = stored_ids(meta["data_ids"], str(path))
            if len(ids) != rows:
                raise StoreError(f"{len(ids)} ids for {rows} rows")
            if meta.get("segment") != path.parent.name or meta.get("rank") != str(shard_rank):
                raise StoreError(
                    f"its header names segment {meta.get('segment')!r}, rank {meta.get('rank')!r}"
                )
        except (StoreError, KeyError, ValueError, TypeError) as e:
            warn(
                f"{path} is not listed in any index and cannot be adopted ({e}); it is "
                "left in place and ignored (move it away to silence this)",
            )
            continue
        found.append(
            {
                "file": rel,
                "segment": path.parent.name,
                "seq": seq,
                "rows": rows,
                "bytes": path.stat().st_size,
                "crc32": file_checksum(path, algorithm) if checksum else None,
                "checksum": algorithm,
                "rank": shard_rank,
                "data_ids": ids,
                "unindexed": True,
            }
        )
    return found


def adopt_unindexed(run_dir: Path, index: dict, width: int, dtype: str) -> list[str]:
    """Add this rank's complete unindexed shards to `index` (in place; the caller writes it);
    returns their files. Also moves `next_seq` past every shard file of the rank."""
    rank = int(index["rank"])
    found = unindexed_shards(run_dir, {rank: index}, width, dtype, rank=rank, checksum=True)
    names = {s["name"] for s in index["segments"]}
    for sh in found:
        entry = {k: sh[k] for k in ("file", "segment", "seq", "rows", "bytes", "crc32")}
        if sh["checksum"] != "crc32":  # absent means zlib CRC-32, as in older stores
            entry["checksum"] = sh["checksum"]
        index["shards"].append(entry)
        if sh["segment"] not in names:
            index["segments"].append({"name": sh["segment"], "meta": {}})
            names.add(sh["segment"])
        warn(
            f"adopted {sh['file']} ({sh['rows']} rows): it was completely written but missing from "
            "the index (the previous writer stopped between writing it and updating the index)",
        )
    index["shards"].sort(key=lambda s: s["seq"])
    seqs = [s["seq"] for s in index["shards"]]
    for path in glob_inside(run_dir, SHARD_DIR, f"*/r{rank:05d}-*.safetensors"):
        match = _SHARD_NAME.match(path.name)
        if match:  # a file that could not be adopted still holds its number
            seqs.append(int(match.group(2)))
    index["next_seq"] = max(int(index.get("next_seq", 0)), max(seqs, default=-1) + 1)
    return [sh["file"] for sh in found]
