"""Reading and checking a store's `manifest.json`: nothing read from a store is trusted."""

from __future__ import annotations

from pathlib import Path

from logix.errors import StoreError
from logix.store.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    ModuleInfo,
    check_module_table,
    read_json,
    total_width,
)
from logix.store.paths import check_run_dir_parent, inside
from logix.store.ranks import manifest_ranks
from logix.version import __version__
from logix.vocabulary import STORAGE_DTYPES


def read_manifest(run_dir: Path) -> dict:
    """The manifest of the store at `run_dir`, checked: format, version, dtype, module table
    (names unique, offsets tiling [0, D)) and width; a StoreError naming the fix otherwise."""
    run_dir = Path(run_dir)
    check_run_dir_parent(run_dir)
    manifest_file = inside(run_dir, MANIFEST)
    if not manifest_file.is_file():
        if run_dir.exists() and not run_dir.is_dir():
            raise StoreError(
                f"{run_dir} is a file, not a logix store directory: pass a directory "
                "path (logix.init(path) creates a store)"
            )
        what = "does not exist" if not run_dir.exists() else "has no manifest.json"
        raise StoreError(
            f"{run_dir} is not a logix store: it {what} ({manifest_file} does not "
            "exist; logix.init(path) creates a store and writes its manifest before "
            "any rows are logged)"
        )
    manifest = read_json(manifest_file)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{manifest_file} is not a logix store manifest (format != {FORMAT_NAME!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StoreError(f"{manifest_file} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{run_dir} was written by a newer logix (store format version {version}; logix "
            f"{__version__} reads up to version {FORMAT_VERSION}): upgrade logix "
            "(pip install -U logix)"
        )
    if manifest.get("dtype") not in STORAGE_DTYPES:
        raise StoreError(f"{manifest_file} names an unknown storage dtype {manifest.get('dtype')!r}")
    table = manifest.get("modules")
    if not isinstance(table, list):
        raise StoreError(
            f"{manifest_file} has no module table (`modules`): the manifest is damaged; "
            "restore it from a backup or log the store again"
        )
    try:
        modules = [ModuleInfo.from_dict(m) for m in table]
    except (KeyError, TypeError) as e:
        raise StoreError(f"{manifest_file} has a damaged module table entry ({e!r})") from None
    check_module_table(modules, str(manifest_file))
    width = manifest.get("width")
    if width != total_width(modules):
        raise StoreError(
            f"{manifest_file} says width {width!r}, its module table gives "
            f"{total_width(modules)}: the manifest is damaged"
        )
    manifest_ranks(manifest, run_dir)
    return manifest
