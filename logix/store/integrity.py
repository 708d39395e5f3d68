"""Integrity checks of a store: shard sizes (quick), crc32 and headers (full), repeated ids, the
projections file and the curvature files. `verify_store` runs every check over every segment
(`logix inspect --full`) and returns the problems found instead of stopping at the first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logix.errors import StoreError
from logix.store.checksum import entry_checksum, file_checksum
from logix.store.format import shard_file
from logix.store.ids import DataId
from logix.store.paths import checked_file
from logix.store.projections import check_projections
from logix.store.shard_io import damage_fix
from logix.store.tagged import checksum_matches, read_tagged

_CRC_BLOCK = 16 << 20
# Every kind of file under curvature/: statistics, and the caches derived from them (eigen, EK-FAC
# eigenvalues, the Gram form's K = G Gᵀ of curvature/precondition.py).
CURVATURE_FORMATS = ("logix-curvature", "logix-eigen", "logix-ekfac-eigenvalues", "logix-gram")


def verify_shards(store: Any, full: bool) -> None:
    """Check a Store view's shards exist with their recorded size; with `full` also crc32 and
    every header against index and manifest (rows, width, dtype, segment, rank)."""
    problems = []
    buf = bytearray(_CRC_BLOCK) if full else None
    for i, sh in enumerate(store.shards):
        file = shard_file(store.path, sh["file"])
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            problems.append(f"{sh['file']} is missing")
            continue
        if size != sh["bytes"]:
            kind = "truncated" if size < sh["bytes"] else "longer than recorded"
            problems.append(f"{sh['file']} is {kind}: {size} bytes on disk, the index records {sh['bytes']}")
            continue
        if full:
            algorithm = entry_checksum(sh)
            crc = file_checksum(file, algorithm, buf)
            if crc != sh["crc32"]:
                problems.append(
                    f"{sh['file']} is corrupted: {algorithm} {crc}, the index records {sh['crc32']}"
                )
                continue
            try:
                store.shard_offset(i)  # parses and checks the header
            except StoreError as e:
                problems.append(str(e).split(". Nothing was changed")[0])
    if problems:
        first = problems[0].split(" ", 1)[0]
        listing = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise StoreError(
            f"store {store.path}, segment {store.segment!r}: {len(problems)} damaged "
            f"shard(s): {listing}. {damage_fix(first)}"
        )


def check_unique_ids(store: Any) -> None:
    """Raise if a data id appears twice in a Store view's segment (across ranks, or within one
    rank's shards: a shard listed twice or a damaged index)."""
    ids = store.data_ids
    if len(set(ids)) == len(ids):
        return
    where: dict[DataId, list[str]] = {}
    for i, sh in enumerate(store.shards):
        for d in store.shard_ids(i):
            where.setdefault(d, []).append(f"rank {sh['rank']} ({sh['file']})")
    dups = [(d, w) for d, w in where.items() if len(w) > 1]
    listing = "; ".join(f"id {d!r} in {' and '.join(w)}" for d, w in dups[:5])
    ranks = {sh["rank"] for sh in store.shards}
    cause = (
        "Each rank must log a disjoint share of the data: torch's DistributedSampler repeats "
        "examples to even out the ranks unless drop_last=True, so pass drop_last=True (or log "
        "each id on one rank only)."
        if len(ranks) > 1
        else "One writer never stores an id twice in a segment, so the index or the shards were "
        "changed outside logix (e.g. a shard listed twice or copied under another number)."
    )
    across = "across ranks" if len(ranks) > 1 else f"within rank {min(ranks)}"
    raise StoreError(
        f"store {store.path}, segment {store.segment!r}: {len(dups)} data id(s) were logged "
        f"more than once {across}: {listing}. {cause} "
        "open_store(path, verify='none') opens the store without this check."
    )


def verify_curvature(directory: Path) -> list[str]:
    """Problems of the curvature files in one segment's directory: unreadable, foreign, or
    not matching the checksum they carry."""
    problems = []
    directory = Path(directory)
    if not directory.is_dir():
        return problems
    for path in sorted(directory.glob("*.safetensors")):
        rel = f"{directory.name}/{path.name}"
        try:
            checked_file(path)
        except StoreError as e:
            problems.append(str(e))
            continue
        try:
            tensors, md = read_tagged(path, CURVATURE_FORMATS, "a logix curvature file")
        except StoreError as e:
            problems.append(f"curvature/{rel} is damaged ({str(e).split(' (', 1)[-1]}")
            continue
        if checksum_matches(tensors, md) is False:
            problems.append(
                f"curvature/{rel} does not match its checksum (bit rot or an edit): "
                "delete it; caches are recomputed, statistics must be logged again"
            )
    return problems


def verify_store(store: Any, full: bool) -> list[str]:
    """Every check over every segment of `store` (a Store); returns the problems found."""
    problems = []
    if full:
        try:
            check_projections(store.path, store.manifest)  # a missing file: see `inspect`
        except StoreError as e:
            problems.append(str(e))
    views = [store.select(name, verify="none") for name in store.segments] or [store]
    for view in views:
        try:
            view.verify(full=full)
            if full:
                view.check_unique_ids()
        except StoreError as e:
            problems.append(str(e))
        if full:
            problems += verify_curvature(view.curvature_dir)
    return problems
