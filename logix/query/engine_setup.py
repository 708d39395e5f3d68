"""The query engine's set-up: the refine / fisher choice checked, (F + λI)⁻¹ built once, refined."""

from __future__ import annotations

from typing import Any

import torch

from logix import comm
from logix.curvature.covariance import ProgressFn
from logix.curvature.precondition import build_preconditioner
from logix.curvature.reduce import share_statistics
from logix.curvature.refine import RefinedPreconditioner
from logix.curvature.true_fisher import held_fisher
from logix.errors import ConfigError, StoreError
from logix.notices import warn
from logix.store.reader import Store


def check_store_ready(store: Store) -> None:
    """Refuse a segment with no rows, saying why: a writer that was not finalized (its rows may
    still be in its buffer) or a segment that holds nothing; warn when some rank is not
    finalized, since the engine then sees only the rows of that rank's completed shards."""
    open_ranks = store.unfinalized_ranks
    where = f"store {store.path}, segment {store.segment!r}"
    if open_ranks and len(store) == 0:
        raise StoreError(
            f"{where} is not finalized (rank(s) {open_ranks}) and has no rows on disk yet: call "
            "`run.finalize()` after logging (or `run.flush()` to query while still logging)"
        )
    if len(store) == 0:
        raise StoreError(
            f"{where} has no rows: log training data into it first, or pick another segment "
            f"(segments: {store.segments})"
        )
    if open_ranks:
        warn(
            f"{where}: rank(s) {open_ranks} not finalized (still logging, or stopped early): "
            f"the engine sees the {len(store)} rows of completed shards only. Call "
            "`run.finalize()` (or `run.flush()` while still logging) before querying"
        )


def engine_device(device: Any) -> torch.device:
    """The device the engine computes on: `device` as `torch.device` reads it (0 is cuda:0), or
    CUDA when present, else the CPU. Checked now, by placing a tensor there, so that a device
    this machine lacks is a ConfigError when the engine starts, not a CUDA error at the first
    query."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"device={device!r} is not a device ({e}): pass 'cpu', 'cuda' or 'cuda:N'") from e
    fix = "pass device='cpu', or leave device unset (CUDA when present, else the CPU)"
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"device={device!r}, but CUDA is not available here ({why}): {fix}")
        count = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= count:
            raise ConfigError(
                f"device={device!r}, but this machine shows {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}): pick one of them, or {fix}"
            )
    try:
        torch.empty(1, device=chosen)
    except Exception as e:  # noqa: BLE001 - any backend's refusal, said with the fix
        raise ConfigError(f"device={device!r} cannot be used here ({e}): {fix}") from e
    return chosen


def checked_fisher(store: Store, preconditioner: str, refine: Any, fisher: str | None) -> str:
    """The Fisher the engine uses ("empirical" | "true"), after checking that `refine` is a
    whole number of passes that this preconditioner and Fisher can take."""
    if isinstance(refine, bool) or int(refine) != refine or refine < 0:
        raise ValueError(f"refine must be a whole number of passes >= 0, got {refine!r}")
    if refine and preconditioner != "ekfac":
        raise ValueError(
            f"refine={refine} needs preconditioner='ekfac' (got {preconditioner!r}): "
            "the refinement is preconditioned by EK-FAC"
        )
    # fisher "auto" (the default) follows the store: its true-Fisher statistics if it holds them.
    fisher = held_fisher(store, preconditioner, "empirical" if fisher == "auto" and refine else fisher)
    if refine and fisher == "true":
        raise ValueError(
            "refine streams the stored rows, i.e. it converges to the empirical "
            "Fisher's solve; it cannot refine a fisher='true' preconditioner"
        )
    return fisher


def engine_preconditioner(
    store: Store,
    rows: Any,
    preconditioner: str,
    damping: float,
    refine: int,
    fisher: str,
    *,
    absolute_damping: bool,
    refine_method: str,
    modules: list[str],
    device: torch.device,
    chunk_rows: int,
    progress: ProgressFn | None,
    distributed: bool,
    form: str = "auto",
) -> Any:
    """The engine's preconditioner of `store` over `modules`: built from the statistics of a
    split pass over each rank's `rows` and sent from rank 0 when `distributed`, and wrapped in
    `refine` refinement passes over `rows` when refine > 0."""

    def build():
        return build_preconditioner(
            store,
            preconditioner,
            damping,
            absolute_damping=absolute_damping,
            modules=modules,
            device=device,
            chunk_rows=chunk_rows,
            progress=progress,
            fisher=fisher,
            form=form,
        )

    if distributed:  # statistics from a split pass; one preconditioner, sent to all
        if fisher != "true":  # true-Fisher statistics come from a model pass, not the rows
            share_statistics(store, rows, preconditioner, chunk_rows=chunk_rows, progress=progress)
        built = comm.on_rank0(build)
    else:
        built = build()
    if not refine:
        return built
    # Distributed: every rank runs the same iterations, each F V pass streaming its own
    # share of the rows, the products summed over ranks.
    return RefinedPreconditioner(
        built,
        rows,
        int(refine),
        method=refine_method,
        chunk_rows=chunk_rows,
        device=device,
        progress=progress,
        reduce=comm.all_reduce_sum if distributed else None,
    )
