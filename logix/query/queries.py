"""What a query batch must be before it meets a store: the same projections and module table,
the store's row width, finite values; and the modules a query is restricted to."""

from __future__ import annotations

from typing import Any

import torch

from logix import comm
from logix.curvature.preconditioner import QuerySide
from logix.errors import ConfigError, StoreError
from logix.store.gradients import Gradients
from logix.store.reader import Store
from logix.vocabulary import check_choice


def checked_queries(q: Gradients | torch.Tensor, store: Store) -> tuple[torch.Tensor, list]:
    """(query rows [n, D] as given, their ids) after checking them against `store`."""
    if isinstance(q, Gradients):
        if q.fingerprint != store.fingerprint:
            raise StoreError(
                f"the query gradients were captured with other projections or another model "
                f"(fingerprint {q.fingerprint[:12]!r} vs the store's "
                f"{store.fingerprint[:12]!r}): capture them with "
                f"logix.init({str(store.path)!r}, mode='query') on this run's model"
            )
        if list(q.modules) != list(store.modules):
            raise StoreError(
                "the query gradients' module table differs from the store's: "
                + table_difference(list(q.modules), list(store.modules))
            )
        values, ids = q.values, list(q.data_ids)
    elif isinstance(q, torch.Tensor):  # raw rows: the caller vouches for their layout
        values, ids = q, list(range(q.shape[0])) if q.ndim == 2 else []
    else:
        raise TypeError(f"queries must be logix Gradients (run.gradients()), got {type(q).__name__}")
    if values.ndim != 2 or values.shape[1] != store.width:
        raise StoreError(
            f"query rows have shape {tuple(values.shape)}; the store's rows are [n, {store.width}]"
        )
    if values.shape[0] == 0:
        raise ValueError("no query rows: capture at least one query example")
    if isinstance(q, Gradients) and _checked_finite(q):
        return values, ids
    finite = torch.isfinite(values).all(dim=1)
    if not bool(finite.all()):
        bad = [ids[i] for i in (~finite).nonzero().flatten().tolist()][:10]
        raise ValueError(
            f"query gradients contain NaN/inf (query ids {bad}): the loss of "
            "these examples is not finite; check the model's outputs for them"
        )
    if isinstance(q, Gradients):
        q._finite_values = (values, values._version)
    return values, ids


def _checked_finite(q: Gradients) -> bool:
    """Whether `q.values` passed the finiteness check before and is unchanged since: the same
    tensor at the same version (torch bumps a tensor's version on every in-place write), so a
    repeat query is not scanned again but an edited one is."""
    seen = getattr(q, "_finite_values", None)
    return seen is not None and seen[0] is q.values and seen[1] == q.values._version


def preconditioned_queries(
    q: Gradients | torch.Tensor,
    store: Store,
    preconditioner: Any,
    device: torch.device,
    precondition: bool = True,
    streamed: bool = False,
    norms: bool = True,
) -> tuple[Any, torch.Tensor, list]:
    """(Q' = Q (F + λI)⁻¹ [n, D] float32, √(qᵀ(F+λI)⁻¹q) [n] float32, ids) on `device`, once
    per query batch. streamed: a `QuerySide` (float32) to score against the store's own rows
    (`Preconditioner.query_side`; norms=False may leave the norms out, as zeros) instead of Q'.
    precondition=False: the queries are only checked (empty tensors come back: a distributed
    engine's other ranks receive rank 0's)."""
    values, ids = checked_queries(q, store)
    if not precondition:
        n, width = values.shape
        empty = torch.empty(n, width, device=device)
        return (QuerySide(empty, {}) if streamed else empty), torch.empty(n, device=device), ids
    v = values.to(device)  # as given: the preconditioner upcasts only the blocks it multiplies
    if streamed:
        side, quad = preconditioner.query_side(v, norms)
        return side.to(device, torch.float32), quad.sqrt().to(torch.float32), ids
    qp = preconditioner.apply(v)
    quad = (v.to(torch.float64) * qp).sum(dim=1).clamp(min=0)
    return qp.to(torch.float32), quad.sqrt().to(torch.float32), ids


def prepared_side(
    q: Gradients | torch.Tensor, store: Store, preconditioner: Any, device: torch.device
) -> tuple[QuerySide, torch.Tensor, list]:
    """A query side the caller has mapped already (e.g. Q f(F + λI) through
    `Preconditioner.spectral`), checked like any query batch and scored as it is: (its selected
    modules' columns [n, D] float32 on `device`, zero norms [n], ids). Refused where a Gram block
    would precondition the train side."""
    if preconditioner.has_gram:
        raise ConfigError(
            "prepared queries are scored against the rows as stored, but this engine holds a "
            "Gram-form block (its train side is preconditioned): build it with form='eigen'"
        )
    values, ids = checked_queries(q, store)
    dense = torch.zeros(values.shape, dtype=torch.float32, device=device)
    for m in preconditioner.selected:
        dense[:, m.columns] = values[:, m.columns].to(device, torch.float32)
    return QuerySide(dense, {}), torch.zeros(values.shape[0], device=device), ids


def shared_queries(
    q: Gradients | torch.Tensor,
    store: Store,
    preconditioner: Any,
    device: torch.device,
    streamed: bool,
    norms: bool,
    distributed: bool,
    collective: bool,
) -> tuple[Any, torch.Tensor, list]:
    """`preconditioned_queries`; in a distributed engine every rank checks its queries and rank
    0's result goes to all (the ranks must pass the same query ids; values may differ in the
    last bits, e.g. captured on different GPUs). collective: every rank preconditions
    (refinement passes stream each rank's share), else rank 0 alone does."""
    if not distributed:
        return preconditioned_queries(q, store, preconditioner, device, True, streamed, norms)
    precondition = comm.rank_and_world()[0] == 0 or collective
    qp, qnorm, ids = comm.together(
        lambda: preconditioned_queries(q, store, preconditioner, device, precondition, streamed, norms)
    )
    dense = qp.dense if streamed else qp
    comm.check_same(
        "the queries",
        (tuple(dense.shape), ids),
        "pass the same query gradients (same ids, same order) on every rank",
    )
    if not streamed:
        return comm.broadcast(qp), comm.broadcast(qnorm), ids
    # Rank 0's Gram score rows (if any) go along, through the CPU: tensors are pickled.
    rows = comm.broadcast_object({k: v.cpu() for k, v in qp.rows.items()} if precondition else None)
    side = QuerySide(comm.broadcast(dense), {k: v.to(device) for k, v in rows.items()})
    return side, comm.broadcast(qnorm), ids


def selected_modules(store: Store, modules: list[str] | str | None) -> list[str]:
    """The names of `modules` (all when None) in the store's table order; unknown names are an
    error that suggests the closest one."""
    names = [m.name for m in store.modules]
    if modules is None:
        return names
    chosen = [modules] if isinstance(modules, str) else list(modules)
    if not chosen:
        raise ValueError("modules is empty: pass None for all modules, or some of " + str(names))
    for name in chosen:
        check_choice(name, tuple(names), "module")
    return [n for n in names if n in set(chosen)]


def table_difference(a: list, b: list) -> str:
    """The first difference between two module tables, in words."""
    if [m.name for m in a] != [m.name for m in b]:
        return f"query modules {[m.name for m in a]} vs store modules {[m.name for m in b]}"
    for x, y in zip(a, b):
        if x != y:
            return f"module {x.name!r}: query {x.to_dict()} vs store {y.to_dict()}"
    return "unknown difference"
