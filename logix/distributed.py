"""torch.distributed helpers: rank and world, collectives that work with gloo and NCCL, the
split of a store's shards over ranks, the merge of top-k lists, and model-wrapper names.

Everything here works without a process group: then the world is one rank and every collective
returns its input, so the same code path serves one process and `torchrun --nproc_per_node N`.
This module depends on torch only; every stage may use it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

# Path components that model wrappers insert into `named_modules()` names: FSDP (v1) and
# activation checkpointing wrap a submodule and expose it under these attribute names.
WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


# ---------------------------------------------------------------------------------- ranks
def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return rank_and_world()[1] > 1


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def comm_device() -> torch.device:
    """Where tensors must be for collectives: the current CUDA device under NCCL, else CPU."""
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------- collectives
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks (a new tensor on t's device; `t` itself when alone)."""
    if not is_distributed():
        return t
    x = t.to(comm_device()).contiguous()
    torch.distributed.all_reduce(x)
    return x.to(t.device)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `t` on every rank (same shape and dtype on all ranks), on t's device."""
    if not is_distributed():
        return t
    x = t.to(comm_device()).contiguous()
    torch.distributed.broadcast(x, src)
    return x.to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (in-memory between the job's own ranks)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src, device=comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * rank_and_world()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def all_gather_columns(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` [..., c_r] along the last dim in rank order: [..., Σ c_r].

    The leading dims must agree; c_r may differ (blocks are padded to the largest for the
    collective and trimmed afterwards)."""
    if not is_distributed():
        return t
    world = rank_and_world()[1]
    widths = [int(w) for w in all_gather_object(int(t.shape[-1]))]
    wide = max(widths)
    dev = comm_device()
    x = torch.zeros((*t.shape[:-1], wide), dtype=t.dtype, device=dev)
    x[..., :t.shape[-1]] = t.to(dev)
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x)
    return torch.cat([p[..., :w] for p, w in zip(parts, widths)], dim=-1).to(t.device)


def gather_columns_to(t: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
    """Like `all_gather_columns`, but only rank `dst` receives the result (others get None):
    for blocks that only one rank writes out, without holding them on every rank."""
    if not is_distributed():
        return t
    rank, world = rank_and_world()
    widths = [int(w) for w in all_gather_object(int(t.shape[-1]))]
    wide = max(widths)
    dev = comm_device()
    x = torch.zeros((*t.shape[:-1], wide), dtype=t.dtype, device=dev)
    x[..., :t.shape[-1]] = t.to(dev)
    parts = [torch.empty_like(x) for _ in range(world)] if rank == dst else None
    torch.distributed.gather(x, parts, dst=dst)
    if rank != dst:
        return None
    return torch.cat([p[..., :w] for p, w in zip(parts, widths)], dim=-1).to(t.device)


def merge_top_k(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of every rank's keys [n, k_r] per row: [n, min(k, Σ k_r)], largest first.

    Keys are distinct int64 that order (score ↓, global train index ↑) (the engine's packed
    keys), so the merge is a plain top-k and breaks ties exactly like one process does."""
    return merge_keys([all_gather_columns(keys)], k)


def merge_keys(parts: list[torch.Tensor], k: int) -> torch.Tensor:
    """The k largest keys per row of the column blocks `parts` ([n, k_r] each): [n, k]."""
    keys = torch.cat(parts, dim=1)
    return torch.topk(keys, min(k, keys.shape[1]), dim=1).values


def _raise_from(rank: int, failure: tuple[str, str]) -> None:
    """Raise another rank's failure here: ValueError stays ValueError, the rest StoreError."""
    from logix.store.format import StoreError

    name, message = failure
    cls = ValueError if name == "ValueError" else StoreError
    raise cls(f"rank {rank} failed: {name}: {message}")


def on_rank0(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its (picklable) result to every rank. An exception on
    rank 0 is raised on every rank, so no rank is left waiting in a later collective."""
    if not is_distributed():
        return fn()
    rank, _ = rank_and_world()
    result: tuple[str, Any] = ("ok", None)
    failure: Exception | None = None
    if rank == 0:
        try:
            result = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            failure = e
            result = ("error", (type(e).__name__, str(e)))
    result = broadcast_object(result if rank == 0 else None)
    if result[0] == "error":
        if failure is not None:
            raise failure
        _raise_from(0, result[1])
    return result[1]


def together(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; when it raises on any rank, raise on every rank (the local
    exception where it happened, a StoreError/ValueError naming the rank elsewhere)."""
    failure: Exception | None = None
    try:
        result = fn()
    except Exception as e:  # re-raised below on every rank
        if not is_distributed():
            raise
        failure, result = e, None
    if not is_distributed():
        return result
    reports = all_gather_object(None if failure is None else (type(failure).__name__, str(failure)))
    if failure is not None:
        raise failure
    for rank, report in enumerate(reports):
        if report is not None:
            _raise_from(rank, report)
    return result


def check_same(what: str, value: Any, fix: str) -> None:
    """Raise on every rank unless all ranks pass an equal `value` (a small picklable key)."""
    values = all_gather_object(value)
    if any(v != values[0] for v in values):
        from logix.store.format import StoreError

        differ = [r for r, v in enumerate(values) if v != values[0]]
        raise StoreError(f"the ranks disagree on {what} (rank(s) {differ} differ from rank 0): {fix}")


# ---------------------------------------------------------------------------------- logging
def finish_logging(run_dir: str | Path, ok: bool = True, statistics: Any = None) -> None:
    """The collective end of logging (`Run.finalize` on every rank, after each rank closed its
    writer; `ok` says whether that succeeded). Curvature `statistics` (a CurvatureStatistics,
    or None) are summed over the ranks into one file per segment and kind. Rank 0 then checks
    the store the ranks wrote together, once: every segment's data ids are disjoint across
    ranks, and the manifest's `ranks` names every rank of this world (so a reader can tell a
    rank that never wrote an index). Shards stay listed in the per-rank indexes: there is no
    merged copy to go stale. A duplicate id raises StoreError on every rank; the rows stay on
    disk. Without a process group of several ranks it does nothing."""
    if not is_distributed():
        return
    rank, world = rank_and_world()
    try:
        barrier()  # every rank's writer has closed (or failed): its index is final
        failed = [r for r, good in enumerate(all_gather_object(bool(ok))) if not good]
    except RuntimeError as e:  # a peer died: this rank's own rows are safe on disk
        from logix.store.format import StoreError

        if statistics is not None and ok:
            statistics.save()  # this rank's own file: its rows are complete

        raise StoreError(
            f"rank {rank} finished logging (its shards and index are final), but not every "
            f"rank reached run.finalize(): {e}. `logix inspect {run_dir}` shows which ranks did "
            "not finalize; store.missing_ids(expected_ids) lists the rows to log again") from e
    if failed and ok:
        warnings.warn(f"rank(s) {failed} could not close their store writer; their rows after "
                      "the last completed shard are missing (logix inspect shows which ranks "
                      "did not finalize)", stacklevel=3)
    if statistics is not None:
        if failed:  # the sums would not match the rows on disk: keep each rank's own file
            if ok:
                statistics.save()
        else:
            reduce_statistics(statistics)
    on_rank0(lambda: _check_and_record(Path(run_dir), world))


def reduce_statistics(statistics: Any) -> None:
    """Sum every rank's curvature statistics (a CurvatureStatistics) with all_reduce and let
    rank 0 write them as `<kind>-r00000.safetensors` per segment; the other ranks then remove
    any file of their own (written by a `flush` or `start_segment` during the run). One file
    instead of one per rank: a raw block of width w takes 8·w² bytes per file. Should a crash
    leave both kinds of file, their row count exceeds the store's and the loader recomputes."""
    from logix.curvature.covariance import Statistics, save_statistics
    from logix.store.format import curvature_dir

    rank, world = rank_and_world()
    segments = sorted({s for seen in all_gather_object(statistics.segments) for s in seen})
    for segment in segments:
        directory = curvature_dir(statistics.run_dir, segment)
        for kind in statistics.kinds:
            local = statistics.statistics(segment, kind)
            total = Statistics(
                kind, local.modules,
                int(all_reduce_sum(torch.tensor([local.rows], dtype=torch.int64)).item()),
                {n: all_reduce_sum(local.tensors[n]) for n in sorted(local.tensors)})
            on_rank0(partial(save_statistics, directory / f"{kind}-r00000.safetensors", total,
                             {"segment": segment, "rank": "0",
                              "ranks": json.dumps(list(range(world)))}))
            if rank != 0:
                (directory / f"{kind}-r{rank:05d}.safetensors").unlink(missing_ok=True)
    barrier()


def _check_and_record(run_dir: Path, world: int) -> None:
    from logix.store.format import MANIFEST, read_json, write_json_atomic
    from logix.store.reader import open_store

    store = open_store(run_dir, verify="none")
    for segment in store.segments:
        view = store.select(segment, verify="none")
        if len({sh["rank"] for sh in view.shards}) > 1:  # one writer checks its own ids
            view.check_unique_ids()
    manifest = read_json(run_dir / MANIFEST)
    ranks = sorted({int(r) for r in manifest.get("ranks", [])} | set(range(world)))
    if manifest.get("ranks") != ranks:
        manifest["ranks"] = ranks
        write_json_atomic(run_dir / MANIFEST, manifest)


# ---------------------------------------------------------------------------------- sharding
def split_shards(rows: list[int], world: int) -> list[tuple[int, int]]:
    """Split shards with `rows[i]` rows into `world` contiguous ranges [first, stop), balanced
    by rows: range r ends at the shard boundary nearest to (r + 1)·N / world. Contiguous
    ranges keep global row order, so rank r's rows are one column block of the score matrix."""
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    starts = [0]
    for n in rows:
        starts.append(starts[-1] + int(n))
    total = starts[-1]
    bounds = [0]
    for r in range(1, world):
        target = r * total / world
        # The boundary nearest to the target, never before the previous one.
        best = min(range(bounds[-1], len(rows) + 1), key=lambda i: (abs(starts[i] - target), i))
        bounds.append(best)
    bounds.append(len(rows))
    return [(bounds[r], bounds[r + 1]) for r in range(world)]


def local_share(store: Any) -> Any:
    """This rank's share of a `Store` view for a distributed query: a `shard_view` of the
    contiguous shard range `split_shards` gives this rank (the whole view with one rank).
    Every rank must see the same shards (checked)."""
    rank, world = rank_and_world()
    shards = [(sh["file"], int(sh["rows"])) for sh in store.shards]
    key = hashlib.blake2b(json.dumps([store.segment, shards]).encode(), digest_size=16).hexdigest()
    check_same(f"the shards of store {store.path}, segment {store.segment!r}", key,
               "open the same finished store on every rank (is logging still writing to it?)")
    first, stop = split_shards([n for _, n in shards], world)[rank]
    return store.shard_view(first, stop)


def share_statistics(store: Any, local: Any, kind: str, *, chunk_rows: int = 4096,
                     progress: Callable[[str, int, int], None] | None = None) -> None:
    """Make sure row-derived curvature statistics of `kind` for `store` are on disk before the
    preconditioner is built: when neither the logged per-rank files nor a saved recompute cover
    the store, each rank streams only its `local` share, the float64 sums are all-reduced and
    rank 0 saves the result (`covariance.save_recomputed`). No rank streams the whole store for
    them. (EK-FAC's refitted eigenvalues are not split yet: rank 0 computes them in one pass over
    the whole store, once, then they are cached on disk.)"""
    from logix.curvature.covariance import (
        ACCUMULATORS,
        compute_statistics,
        save_recomputed,
        saved_statistics,
    )

    if kind not in ACCUMULATORS:  # identity, or statistics that do not come from the rows
        return
    if on_rank0(lambda: saved_statistics(store, kind) is not None):
        return
    stats = together(lambda: compute_statistics(local, kind, chunk_rows=chunk_rows,
                                                progress=progress))
    for name in sorted(stats.tensors):  # the same order on every rank
        stats.tensors[name] = all_reduce_sum(stats.tensors[name])
    stats.rows = int(all_reduce_sum(torch.tensor([stats.rows], dtype=torch.int64)).item())
    on_rank0(lambda: save_recomputed(store, stats))


# ---------------------------------------------------------------------------------- wrappers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel / DataParallel / FSDP (v1) wrapper holds; `model`
    itself when it is not wrapped (FSDP v2's `fully_shard` does not rename modules)."""
    wrappers: tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def canonical_name(name: str) -> str:
    """A module name without the components wrappers insert: 'a._fsdp_wrapped_module.fc1'
    becomes 'a.fc1', so a store's module table does not depend on how the model was wrapped."""
    if not any(w in name for w in WRAPPER_COMPONENTS):
        return name
    return ".".join(p for p in name.split(".") if p not in WRAPPER_COMPONENTS)


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`model.named_modules()` of the unwrapped model under canonical names, wrapper modules
    (whose canonical name repeats their child's) left out."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    items = list(unwrap_model(model).named_modules())
    for raw, module in reversed(items):  # innermost first: the wrapped module keeps the name
        name = canonical_name(raw)
        if name in seen:
            continue
        seen.add(name)
        out.append((name, module))
    return out[::-1]
