"""The header of a shard an index lists: its data offset and ids, checked against the entry.

Nothing read from a store is trusted: the header must agree with the index entry (rows,
segment, rank) and the manifest (width, dtype), and a mismatch says how to repair the store.
"""

from __future__ import annotations

from pathlib import Path

from logix.errors import StoreError
from logix.store.format import shard_file, shard_layout
from logix.store.ids import DataId, stored_ids
from logix.store.shard_io import damage_fix


def read_listed_header(run_dir: Path, entry: dict, width: int, dtype: str) -> tuple[int, list[DataId]]:
    """(absolute file offset of row 0, data ids) of the shard of index entry `entry` (with its
    "rank"); a StoreError naming the fix when the file is missing or disagrees."""
    try:
        rows, offset, meta = shard_layout(shard_file(run_dir, entry["file"]), width, dtype)
        ids = stored_ids(meta["data_ids"], f"shard {entry['file']}")
    except FileNotFoundError:
        raise StoreError(f"shard {entry['file']} is missing. {damage_fix(entry['file'])}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(
            f"shard {entry['file']} has damaged metadata ({e}). {damage_fix(entry['file'])}"
        ) from e
    if rows != entry["rows"] or len(ids) != rows:
        raise StoreError(
            f"shard {entry['file']} holds {rows} rows and {len(ids)} ids, the index records "
            f"{entry['rows']} rows. {damage_fix(entry['file'])}"
        )
    if meta.get("segment") != entry["segment"] or meta.get("rank") != str(entry["rank"]):
        raise StoreError(
            f"shard {entry['file']} says segment {meta.get('segment')!r}, rank "
            f"{meta.get('rank')!r} in its header; the index says segment "
            f"{entry['segment']!r}, rank {entry['rank']}. {damage_fix(entry['file'])}"
        )
    return offset, ids
