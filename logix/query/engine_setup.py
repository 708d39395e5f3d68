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
from logix.store.reader import Store


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
