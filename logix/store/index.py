"""The per-rank shard tables (`index/rank-NNNNN.json`): created, read and validated here.

Nothing read from a store is trusted: every segment name must be a valid name and every shard's
file must be exactly the path its (segment, rank, seq) gives, so no entry can point outside the
run directory.
"""

from __future__ import annotations

from pathlib import Path

from logix.errors import StoreError
from logix.store.checksum import CHECKSUMS
from logix.store.format import INDEX_DIR, check_segment_name, index_path, read_json, shard_relpath
from logix.store.paths import glob_inside

_SHARD_KEYS = {"file": str, "segment": str, "seq": int, "rows": int, "bytes": int}


def new_index(rank: int) -> dict:
    """The index of a rank that has written nothing yet."""
    return {"rank": int(rank), "segments": [], "shards": [], "next_seq": 0}


def valid_segment(name: object, where: str) -> str:
    """`name` when it is a valid segment name, else a StoreError naming `where` it came from."""
    try:
        return check_segment_name(name)  # type: ignore[arg-type]
    except ValueError as e:
        raise StoreError(
            f"{where} names segment {name!r}, which is not a valid segment name ({e}); "
            "the file is damaged or was not written by logix"
        ) from None


def check_index(idx: object, rank: int, where: Path) -> dict:
    """Validate one rank's index (types, segment names, shard paths) and return it."""
    if (
        not isinstance(idx, dict)
        or not isinstance(idx.get("shards", []), list)
        or not isinstance(idx.get("segments", []), list)
    ):
        raise StoreError(f"{where} is not a logix shard index (no `shards` / `segments` lists)")
    if idx.get("rank") != rank:
        raise StoreError(f"{where} says rank {idx.get('rank')}; the file name says rank {rank}")
    for s in idx.get("segments", []):
        if not isinstance(s, dict) or not isinstance(s.get("meta", {}), dict):
            raise StoreError(f"{where} has a damaged segment entry {s!r}")
        valid_segment(s.get("name"), str(where))
    seen = set()
    for sh in idx.get("shards", []):
        if not isinstance(sh, dict) or any(
            not isinstance(sh.get(k), t) or isinstance(sh.get(k), bool) for k, t in _SHARD_KEYS.items()
        ):
            raise StoreError(f"{where} has a damaged shard entry {sh!r}")
        segment = valid_segment(sh["segment"], str(where))
        expected = shard_relpath(segment, rank, sh["seq"])
        if sh["file"] != expected:
            raise StoreError(
                f"{where} lists shard file {sh['file']!r}; a shard of rank {rank}, "
                f"segment {segment!r}, number {sh['seq']} must be {expected!r}. "
                "Nothing outside the run directory is read: the index is damaged"
            )
        if sh["file"] in seen:
            raise StoreError(
                f"{where} lists shard {sh['file']} twice: the index is damaged "
                "(its rows would be counted twice)"
            )
        seen.add(sh["file"])
        if not all(0 <= sh[k] < 2**63 for k in ("rows", "bytes", "seq")):
            raise StoreError(f"{where} has a shard entry with a count out of range: {sh!r}")
        crc = sh.get("crc32")
        if not isinstance(crc, str) or len(crc) != 8 or any(c not in "0123456789abcdef" for c in crc):
            raise StoreError(
                f"{where} records crc32 {crc!r} for {sh['file']} (8 hex digits expected): the "
                "shard could not be checked, so the index is damaged"
            )
        if sh.get("checksum", "crc32") not in CHECKSUMS:
            raise StoreError(
                f"{where} records checksum {sh.get('checksum')!r} for {sh['file']} (one of "
                f"{CHECKSUMS} expected): the shard could not be checked, so the index is damaged"
            )
    check_next_seq(idx, where)
    return idx


def check_next_seq(idx: dict, where: Path) -> None:
    """`next_seq`, the number of the rank's next shard, must follow every listed shard (a lower
    one would make the writer replace a shard); an index without it is older and fine."""
    if "next_seq" not in idx:
        return
    value = idx["next_seq"]
    after = max((sh["seq"] + 1 for sh in idx.get("shards", [])), default=0)
    if isinstance(value, bool) or not isinstance(value, int) or not after <= value < 2**63:
        raise StoreError(
            f"{where} says next_seq {value!r}, but its shards need a number of at least {after}: "
            "the index is damaged (a writer would replace a listed shard)"
        )


def read_index(run_dir: Path, rank: int) -> dict | None:
    """Rank `rank`'s validated index, or None when it has none."""
    path = index_path(run_dir, rank)
    if not path.is_file():
        return None
    return check_index(read_json(path), rank, path)


def read_indexes(run_dir: Path) -> dict[int, dict]:
    """Every rank's validated index, by rank."""
    out: dict[int, dict] = {}
    for p in glob_inside(run_dir, INDEX_DIR, "rank-*.json"):
        number = p.stem.split("-", 1)[1]
        if not number.isdigit():
            continue
        rank = int(number)
        out[rank] = check_index(read_json(p), rank, p)
    return out


def segment_entry(index: dict, name: str) -> dict:
    """The entry of segment `name` in `index`, created if needed."""
    for s in index["segments"]:
        if s["name"] == name:
            return s
    entry = {"name": name, "meta": {}}
    index["segments"].append(entry)
    return entry


def next_segment_name(names: list[str]) -> str:
    """The next unused number among segment `names`."""
    return str(max((int(n) for n in names if n.isdigit()), default=-1) + 1)


def segment_metas(indexes: dict[int, dict]) -> dict[str, dict]:
    """Every segment of the ranks' `indexes` (also one only a shard names) -> its merged meta,
    in order of first appearance by rank; the lowest rank wins a meta key."""
    metas: dict[str, dict] = {}
    for rank in sorted(indexes):
        idx = indexes[rank]
        for s in idx.get("segments", []):
            metas.setdefault(s["name"], {})
            metas[s["name"]] = {**s.get("meta", {}), **metas[s["name"]]}
        for sh in idx.get("shards", []):
            metas.setdefault(sh["segment"], {})
    return metas


def segment_shards(indexes: dict[int, dict], segment: str) -> list[dict]:
    """The shard entries of `segment` over every rank, each with its "rank", in (rank, seq)
    order: the order of the segment's rows."""
    return sorted(
        (
            {**sh, "rank": rank}
            for rank in sorted(indexes)
            for sh in indexes[rank].get("shards", [])
            if sh["segment"] == segment
        ),
        key=lambda sh: (sh["rank"], sh["seq"]),
    )
