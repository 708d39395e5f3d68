"""The projections file checked against the manifest: its sha256 is part of the fingerprint
(`create.fingerprint`), so a damaged or replaced file is found before it gives wrong scores or
a resumed run logs rows with other projections."""

from __future__ import annotations

import hashlib
from pathlib import Path

from logix.errors import StoreError
from logix.store.create import fingerprint
from logix.store.format import PROJECTIONS, ModuleInfo
from logix.store.paths import inside


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def check_projections(run_dir: Path, manifest: dict, required: bool = False) -> None:
    """Raise StoreError when `projections.safetensors` does not match the manifest's fingerprint
    (a missing file is an error only when `required`: it is needed to capture, not to read
    stored rows)."""
    path = inside(run_dir, PROJECTIONS)
    if not path.is_file():
        if required:
            raise StoreError(
                f"{path} is missing: the store's projections are lost; it cannot be "
                "extended or queried with new gradients (its rows stay readable)"
            )
        return
    modules = [ModuleInfo.from_dict(m) for m in manifest["modules"]]
    if fingerprint(modules, file_sha256(path)) != manifest.get("fingerprint"):
        raise StoreError(
            f"{path} does not match the store's manifest (its digest differs from the "
            "fingerprint): the projections are damaged or were replaced, and gradients captured "
            "with them would give wrong scores. Restore the file from a backup; the rows already "
            "stored stay valid (open_store(path, verify='none') reads them)"
        )
