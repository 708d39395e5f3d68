"""torch.distributed helpers at the base of the stages: rank and world, and collectives that
work with gloo and NCCL.

Everything here works without a process group: then the world is one rank and every collective
returns its input, so the same code path serves one process and `torchrun --nproc_per_node N`.
Depends on torch and `logix.errors` only; each stage keeps its own reductions (store: the end of
logging; curvature: statistics sums; query: shard split and top-k merge).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from logix.errors import StoreError

T = TypeVar("T")


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
    x[..., : t.shape[-1]] = t.to(dev)
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
    x[..., : t.shape[-1]] = t.to(dev)
    parts = [torch.empty_like(x) for _ in range(world)] if rank == dst else None
    torch.distributed.gather(x, parts, dst=dst)
    if rank != dst:
        return None
    return torch.cat([p[..., :w] for p, w in zip(parts, widths)], dim=-1).to(t.device)


def _raise_from(rank: int, failure: tuple[str, str]) -> None:
    """Raise another rank's failure here: ValueError stays ValueError, the rest StoreError."""
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
        differ = [r for r, v in enumerate(values) if v != values[0]]
        raise StoreError(f"the ranks disagree on {what} (rank(s) {differ} differ from rank 0): {fix}")
