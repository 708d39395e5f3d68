"""Creating and removing a store's files: projections, config copy, then the manifest (the
commit point: a directory without it holds no store). Rank 0 writes; `Run` shares the result."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from logix.errors import StoreError
from logix.store.ann import ANN_DIR
from logix.store.format import (
    CURVATURE_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_DIR,
    MANIFEST,
    PROJECTIONS,
    SHARD_DIR,
    ModuleInfo,
    total_width,
    write_atomic,
    write_json_atomic,
)
from logix.store.lock import creation_lock, lock_all_writers
from logix.store.paths import check_run_dir_parent, inside
from logix.store.trajectory import TRAJECTORY_DIR
from logix.version import __version__

CONFIG_COPY = "config.yaml"


def create_store(
    run_dir: Path,
    config: dict[str, Any],
    config_yaml: str,
    modules: list[ModuleInfo],
    projections: bytes,
    projection_info: dict[str, Any],
    world_size: int,
) -> dict:
    """Write the projections file (safetensors bytes), the config copy and the manifest, in
    that order; returns the manifest. `config` is the resolved config as a dict.

    Exclusive: creators of one directory take turns (`creation_lock`) and only the first finds
    no manifest; every later one gets a StoreError and changes nothing."""
    run_dir = Path(run_dir)
    check_run_dir_parent(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise StoreError(
            f"{run_dir} is a file, not a directory: logix.init needs a directory "
            "path for the store (it is created if missing)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the run directory {run_dir} ({e}): choose a writable path") from e
    lock = creation_lock(run_dir)
    try:
        if inside(run_dir, MANIFEST).exists():
            raise StoreError(
                f"{run_dir} already holds a logix store: another process created it while this "
                "one was starting (one writer per run directory). Log into another directory, "
                "or join it with logix.init(path, resume=True) once that process is done"
            )
        write_atomic(inside(run_dir, PROJECTIONS), lambda tmp: tmp.write_bytes(projections))
        write_atomic(inside(run_dir, CONFIG_COPY), lambda tmp: tmp.write_text(config_yaml, encoding="utf-8"))
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": config,
            "modules": [m.to_dict() for m in modules],
            "width": total_width(modules),
            "dtype": config["store"]["dtype"],
            "fingerprint": fingerprint(modules, hashlib.sha256(projections).hexdigest()),
            "projection": projection_info,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "logix_version": __version__,
            "ranks": list(range(world_size)),  # the ranks that log into this store
        }
        write_json_atomic(inside(run_dir, MANIFEST), manifest)  # the commit point
        return manifest
    finally:
        lock.release()


def remove_store(run_dir: Path) -> None:
    """Delete the logix files of a store (and nothing else in the directory): rows, statistics,
    the recorded trajectory and approximate indexes too, so nothing of the old store outlives it;
    a StoreError naming the process when a writer of the store is still running."""
    run_dir = Path(run_dir)
    files = [inside(run_dir, name) for name in (MANIFEST, PROJECTIONS, CONFIG_COPY)]
    dirs = [inside(run_dir, d) for d in (SHARD_DIR, CURVATURE_DIR, TRAJECTORY_DIR, ANN_DIR, INDEX_DIR)]
    held = lock_all_writers(run_dir)
    try:
        for path in files:
            path.unlink(missing_ok=True)
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)
    finally:
        for lock in held:
            lock.release()


def fingerprint(modules: list[ModuleInfo], projections_sha: str) -> str:
    """A key of the module table and the projection matrices: queries must match it."""
    table = json.dumps([m.to_dict() for m in modules], sort_keys=True)
    return hashlib.sha256(f"{table}\n{projections_sha}".encode()).hexdigest()
