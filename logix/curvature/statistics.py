"""Curvature statistics on disk: one summed `Statistics` object per kind and segment, its
file format (float64 tensors + metadata + checksum; never pickled), and the per-rank sum on load.

Each file holds float64 tensors keyed by module name (`raw`) or `<module>.A` / `<module>.S`
(factor kinds), and metadata with the kind, the row count, the module table and, for factor
kinds, the positions per module. Loading is keyed by the kind string only, so variants such as
`kfac.true` load with the same code. Statistics summed while logging or in a pass also record
which rows they cover (`covers`: `ids_coverage` of their data ids, and `pass`: who summed
them), so that a query can tell factors that cover exactly the store's rows from stale ones.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from logix.errors import StoreError
from logix.store.format import ModuleInfo, write_atomic
from logix.store.paths import checked_file
from logix.store.tagged import CHECKSUM_KEY, checksum_matches, read_tagged, tensors_checksum

FORMAT = "logix-curvature"
COVERAGE_MODULUS = 2**128
FIT_PASS = "fit_curvature"  # metadata "pass" of statistics from a statistics pass


def ids_coverage(ids) -> int:
    """An order-free key of a set of data ids: the sum mod 2¹²⁸ of each id's blake2b (tagged by
    type, so 1 and "1" differ). Sums over disjoint sets (ranks, resumed lives) add up."""
    total = 0
    for i in ids:
        tagged = b"s" + i.encode() if isinstance(i, str) else b"i%d" % i
        total += int.from_bytes(hashlib.blake2b(tagged, digest_size=16).digest(), "little")
    return total % COVERAGE_MODULUS


@dataclass
class Statistics:
    """Summed statistics of one kind for one segment: `tensors[key]` float64, over `rows` rows
    (examples); factor kinds also count `positions[module]` (the positions summed into A)."""

    kind: str
    modules: list[ModuleInfo]
    rows: int
    tensors: dict[str, torch.Tensor]
    sources: list[str] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    covers: int | None = None  # ids_coverage of the rows summed; None when not recorded
    fitted: bool = False  # summed by a statistics pass (`run.fit_curvature()`), not while logging
    _digests: dict[str, str] = field(default_factory=dict, repr=False)

    def fisher(self, name: str) -> torch.Tensor:
        """F_m = S_m / N, [w, w] float64 (`raw`)."""
        return self.tensors[name] / max(self.rows, 1)

    def digest(self, key: str) -> str:
        """A content key of one tensor (with the counts it is normalised by), for caches."""
        if key not in self._digests:
            t = self.tensors[key].contiguous()
            h = hashlib.blake2b(digest_size=16)
            module = key.rsplit(".", 1)[0] if key not in {m.name for m in self.modules} else key
            h.update(f"{self.kind}:{self.rows}:{self.positions.get(module, '')}:{tuple(t.shape)}:".encode())
            h.update(t.numpy().data)
            self._digests[key] = h.hexdigest()
        return self._digests[key]


def _modules_json(modules: list[ModuleInfo]) -> str:
    return json.dumps([m.to_dict() for m in modules])


def save_statistics(path: Path, stats: Statistics, extra: dict[str, str] | None = None) -> Path:
    """Write `stats` atomically (see `write_atomic`), with a checksum of its tensors."""
    path = checked_file(path)  # no link (its directory is checked by curvature_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in stats.tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=statistics_metadata(stats, extra)))
    return path


def statistics_metadata(stats: Statistics, extra: dict[str, str] | None) -> dict[str, str]:
    metadata = {
        "format": FORMAT,
        "kind": stats.kind,
        "rows": str(stats.rows),
        "modules": _modules_json(stats.modules),
        **(extra or {}),
        CHECKSUM_KEY: tensors_checksum(stats.tensors),
    }
    if stats.positions:
        metadata["positions"] = json.dumps(stats.positions)
    if stats.covers is not None:
        metadata["covers"] = f"{stats.covers:032x}"
    if stats.fitted:
        metadata["pass"] = FIT_PASS
    return metadata


def read_statistics(path: Path) -> tuple[Statistics, dict[str, str]]:
    """One statistics file and its metadata; a StoreError when it is damaged or fails its
    checksum (statistics are not recomputed silently: they come from a logging pass)."""
    tensors, md = read_tagged(checked_file(path), FORMAT, "a logix curvature file", "delete it to recompute")
    if checksum_matches(tensors, md) is False:
        raise StoreError(
            f"{path} does not match the checksum of its tensors (bit rot or an edit): its "
            "statistics would give wrong scores. Restore it from a backup, or delete it and log "
            "the statistics again (raw statistics are recomputed from the rows when deleted)"
        )
    return statistics_from(path, tensors, md), md


def statistics_from(source: Path | str, tensors: dict[str, torch.Tensor], md: dict[str, str]) -> Statistics:
    try:
        modules = [ModuleInfo.from_dict(d) for d in json.loads(md["modules"])]
        positions = {k: int(v) for k, v in json.loads(md.get("positions", "{}")).items()}
        covers = int(md["covers"], 16) % COVERAGE_MODULUS if "covers" in md else None
        fitted = md.get("pass") == FIT_PASS
        return Statistics(
            md["kind"], modules, int(md["rows"]), tensors, [str(source)], positions, covers, fitted
        )
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise StoreError(f"{source} has damaged metadata ({e!r}); delete it to recompute") from None


def load_statistics(directory: str | Path, kind: str = "raw") -> Statistics | None:
    """Sum the per-rank files `<kind>-rNNNNN.safetensors` in a segment's curvature dir."""
    pattern = re.compile(rf"^{re.escape(kind)}-r\d+\.safetensors$")
    directory = Path(directory)
    files = sorted(p for p in directory.glob(f"{kind}-r*.safetensors") if pattern.match(p.name))
    total: Statistics | None = None
    for path in files:
        stats, _ = read_statistics(path)
        if total is None:
            total = stats
            continue
        if stats.modules != total.modules:
            raise StoreError(f"{path} has a different module table than {total.sources[0]}")
        if set(stats.tensors) != set(total.tensors):
            raise StoreError(
                f"{path} holds other tensors than {total.sources[0]}; delete the stale one and recompute it"
            )
        for name, t in stats.tensors.items():
            total.tensors[name] += t
        for name, count in stats.positions.items():
            total.positions[name] = total.positions.get(name, 0) + count
        total.rows += stats.rows
        total.sources.append(str(path))
        both = None not in (total.covers, stats.covers)
        total.covers = (total.covers + stats.covers) % COVERAGE_MODULUS if both else None
        total.fitted = total.fitted and stats.fitted
    return total
