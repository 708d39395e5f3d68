"""The collective end of logging under torch.distributed: every rank's writer closed, then
rank 0 checks that the ranks' data ids are disjoint and records the ranks in the manifest."""

from __future__ import annotations

from pathlib import Path

from logix.comm import all_gather_object, barrier, is_distributed, on_rank0, rank_and_world
from logix.errors import StoreError
from logix.notices import warn
from logix.store.format import MANIFEST, read_json, write_json_atomic
from logix.store.paths import inside
from logix.store.reader import open_store


def finish_logging(run_dir: str | Path, ok: bool = True) -> list[int]:
    """The collective end of logging (`Run.finalize` on every rank, after each rank closed its
    writer; `ok` says whether that succeeded): returns the ranks whose close failed. A peer
    that died raises StoreError here (this rank's own rows are safe on disk). Without a process
    group of several ranks it returns [] at once."""
    if not is_distributed():
        return []
    rank, _ = rank_and_world()
    try:
        barrier()  # every rank's writer has closed (or failed): its index is final
        failed = [r for r, good in enumerate(all_gather_object(bool(ok))) if not good]
    except RuntimeError as e:  # a peer died: this rank's own rows are safe on disk
        raise StoreError(
            f"rank {rank} finished logging (its shards and index are final), but not every "
            f"rank reached run.finalize(): {e}. `logix inspect {run_dir}` shows which ranks did "
            "not finalize; store.missing_ids(expected_ids) lists the rows to log again"
        ) from e
    if failed and ok:
        warn(
            f"rank(s) {failed} could not close their store writer; their rows after "
            "the last completed shard are missing (logix inspect shows which ranks "
            "did not finalize)",
        )
    return failed


def record_ranks(run_dir: str | Path) -> None:
    """Rank 0 checks the store the ranks wrote together, once: every segment's data ids are
    disjoint across ranks, and the manifest's `ranks` names every rank of this world (so a
    reader can tell a rank that never wrote an index). Shards stay listed in the per-rank
    indexes: there is no merged copy to go stale. A duplicate id raises StoreError on every
    rank; the rows stay on disk. Without a process group it does nothing."""
    if not is_distributed():
        return
    _, world = rank_and_world()
    on_rank0(lambda: _check_and_record(Path(run_dir), world))


def _check_and_record(run_dir: Path, world: int) -> None:
    store = open_store(run_dir, verify="none")
    for segment in store.segments:
        view = store.select(segment, verify="none")
        if len({sh["rank"] for sh in view.shards}) > 1:  # one writer checks its own ids
            view.check_unique_ids()
    manifest = read_json(inside(run_dir, MANIFEST))
    ranks = sorted({int(r) for r in manifest.get("ranks", [])} | set(range(world)))
    if manifest.get("ranks") != ranks:
        manifest["ranks"] = ranks
        write_json_atomic(inside(run_dir, MANIFEST), manifest)
