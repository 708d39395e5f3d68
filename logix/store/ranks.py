"""The ranks a store's manifest names, each of which must have its index: a rank whose index is
missing (its writer never started, or the file was lost) would otherwise drop its rows from
every read without a word."""

from __future__ import annotations

from pathlib import Path

from logix.errors import StoreError
from logix.notices import warn
from logix.store.format import MANIFEST, index_path
from logix.vocabulary import MISSING_RANKS, check_choice


def manifest_ranks(manifest: dict, run_dir: Path) -> list[int]:
    """The manifest's `ranks` (the ranks that log into the store), checked: distinct
    non-negative ints; [] for a store written before the key existed."""
    ranks = manifest.get("ranks", [])
    if (
        not isinstance(ranks, list)
        or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 2**31 for r in ranks)
        or len(set(ranks)) != len(ranks)
    ):
        raise StoreError(
            f"{Path(run_dir) / MANIFEST} has a damaged `ranks` entry {ranks!r} (a list of distinct "
            "rank numbers): the manifest is damaged; restore it from a backup"
        )
    return sorted(ranks)


def check_ranks(run_dir: Path, manifest: dict, indexes: dict[int, dict], missing_ranks: str) -> list[int]:
    """The ranks the manifest names that have no index. missing_ranks="error": a StoreError
    naming them and the fix when there are any; "warn": a warning (their rows are left out)."""
    check_choice(missing_ranks, MISSING_RANKS, "missing_ranks")
    missing = [r for r in manifest_ranks(manifest, run_dir) if r not in indexes]
    if not missing:
        return []
    files = ", ".join(str(index_path(run_dir, r).relative_to(run_dir)) for r in missing)
    what = (
        f"{run_dir}: rank(s) {missing} are named in the manifest (`ranks`) but have no index "
        f"({files}): their writer never started, or the index was deleted, so their rows are "
        "missing from this store"
    )
    if missing_ranks == "warn":
        warn(f"{what}; opening the other ranks' rows only")
        return missing
    raise StoreError(
        f"{what}. Restore the index from a backup; or log those ranks' share again (each "
        "missing rank runs logix.init(run_dir, resume=True) and logs its ids); or open the rows "
        "that are there with open_store(path, missing_ranks='warn')"
    )
