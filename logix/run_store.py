"""What a logging `Run` writes to create a store, and how it checks a model against one.

The module table comes from the watched layers and the projection config; the store is created
by rank 0 (projections, config copy, then the manifest: the commit point) and every other rank
reads rank 0's projections back, so all ranks capture with the same matrices.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from logix.capture.per_sample import has_bias, layer_dims, layer_type
from logix.capture.projection import (
    ModuleProjection,
    load_projections,
    save_projections,
)
from logix.config import LogixConfig
from logix.store.format import (
    CURVATURE_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_DIR,
    MANIFEST,
    PROJECTIONS,
    SHARD_DIR,
    ModuleInfo,
    StoreError,
    read_json,
    total_width,
    write_json_atomic,
)

CONFIG_COPY = "config.yaml"


def module_table(selected: list[tuple[str, nn.Module]], config: LogixConfig) -> list[ModuleInfo]:
    """The store's module table for the watched layers: dims, ranks (clamped to each side's
    width) and column offsets in the row of width D."""
    table, offset = [], 0
    for name, module in selected:
        d_in, d_out = layer_dims(module, config.capture.bias)
        if config.projection.kind == "identity":
            r_in, r_out = d_in, d_out
        else:
            r_in, r_out = min(config.projection.rank_in, d_in), min(config.projection.rank_out, d_out)
        info = ModuleInfo(name, layer_type(module), d_in, d_out, r_in, r_out,
                          has_bias(module, config.capture.bias), offset)
        table.append(info)
        offset += info.width
    return table


def check_model(manifest: dict, modules: list[ModuleInfo], run_dir: Path) -> None:
    """The model must have exactly the modules (and shapes) the store was logged with."""
    stored = [ModuleInfo.from_dict(d) for d in manifest["modules"]]
    if stored == modules:
        return
    have = {m.name: m for m in modules}
    want = {m.name: m for m in stored}
    problems = [f"missing module {n!r}" for n in want if n not in have]
    problems += [f"extra module {n!r}" for n in have if n not in want]
    for n in want.keys() & have.keys():
        a, b = want[n], have[n]
        for key in ("type", "d_in", "d_out", "r_in", "r_out", "bias"):
            if getattr(a, key) != getattr(b, key):
                problems.append(f"{n}.{key} is {getattr(a, key)} in the store, {getattr(b, key)} in the model")
    if not problems:
        problems.append("modules are in a different order")
    raise StoreError(
        f"the model does not match the store at {run_dir}: " + "; ".join(problems[:6])
        + ". Use the model the store was logged with (same architecture and capture config)."
    )


def create_store(run_dir: Path, config: LogixConfig, modules: list[ModuleInfo],
                 projections: dict[str, ModuleProjection], notes: list[str], rank: int,
                 world_size: int, info: dict | None = None) -> tuple[dict, dict[str, ModuleProjection]]:
    """Write projections, config copy and manifest (last: the commit point). Returns the
    manifest and the projections every rank uses (rank 0's, read back by the others)."""
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        sha = save_projections(run_dir / PROJECTIONS, projections)
        config.to_yaml(run_dir / CONFIG_COPY)
        from logix.version import __version__

        p = config.projection
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": config.to_dict(),
            "modules": [m.to_dict() for m in modules],
            "width": total_width(modules),
            "dtype": config.store.dtype,
            "fingerprint": fingerprint(modules, sha),
            "projection": {"kind": p.kind, "seed": p.seed, "notes": notes, **(info or {})},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "logix_version": __version__,
            "ranks": list(range(world_size)),  # the ranks that log into this store
        }
        write_json_atomic(run_dir / MANIFEST, manifest)  # the commit point
    if world_size > 1:
        torch.distributed.barrier()
        if rank != 0:
            manifest = read_json(run_dir / MANIFEST)
            dims = {m.name: (m.d_in, m.d_out, m.r_in, m.r_out) for m in modules}
            projections = load_projections(run_dir / PROJECTIONS, dims)
    return manifest, projections


def remove_store(run_dir: Path) -> None:
    """Delete the logix files of a store (and nothing else in the directory)."""
    for name in (MANIFEST, PROJECTIONS, CONFIG_COPY):
        (run_dir / name).unlink(missing_ok=True)
    for name in (INDEX_DIR, SHARD_DIR, CURVATURE_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def fingerprint(modules: list[ModuleInfo], projections_sha: str) -> str:
    """A key of the module table and the projection matrices: queries must match it."""
    table = json.dumps([m.to_dict() for m in modules], sort_keys=True)
    return hashlib.sha256(f"{table}\n{projections_sha}".encode()).hexdigest()
