"""Scores combined over segments (checkpoints): TracIn-CP, Σ_s w_s · I_s(q, z).

Each segment holds the training gradients at one checkpoint; the queries must be captured at
the same checkpoint (one `Gradients` per segment). A segment's weight is, by default, the
learning rate logged with it (`run.start_segment(name, lr=...)`). Segments may list the training
examples in different orders (shuffled loaders): columns are aligned by data id. Segments that
trained on different examples (training stages) combine with `missing="zero"`: an example
contributes nothing in a segment that did not log it. The stage-wise combination of
approximate unrolling (SOURCE) is `logix.query.stagewise.stagewise_scores`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from logix.errors import StoreError
from logix.query.engine import InfluenceEngine
from logix.query.results import Scores
from logix.store.gradients import Gradients
from logix.vocabulary import check_choice

MISSING = ("error", "zero")


def open_any(store):
    """A `Store` as given, or the store at a run directory."""
    if isinstance(store, (str, os.PathLike)):
        from logix.store.reader import open_store

        return open_store(store)
    return store


def union_ids(segment_stores: list) -> tuple[list, dict]:
    """The union of the segments' data ids in order of first appearance, and id -> column."""
    ids: list = []
    position: dict = {}
    for seg in segment_stores:
        for tid in seg.data_ids:
            if tid not in position:
                position[tid] = len(ids)
                ids.append(tid)
    return ids, position


def combined_scores(
    store,
    queries: dict[str, Gradients],
    *,
    weights: dict[str, float] | None = None,
    missing: str = "error",
    **engine_options: Any,
) -> Scores:
    """Σ_s weight_s · scores of segment s: `.values` [n_query, n_train] with `train_ids`.

    store: a `Store` (any segment selected) or a run directory; queries: segment name ->
    query gradients captured with that segment's model; weights: segment -> weight (default:
    each segment's logged `lr`, an error if one has none). missing: "error" (default) when the
    segments hold different training ids, "zero" to score the union of their ids (in order of
    first appearance; the first segment's order when all hold the same ids), an example adding
    nothing in a segment that did not log it. The queries must have the same ids everywhere.
    engine_options: those of `InfluenceEngine` (preconditioner, damping, mode, fisher, refine,
    device, ...; each defaults to the store's `query:` config, as for one segment); each segment
    is scored by its own engine.
    """
    if not queries:
        raise ValueError("queries is empty: give one Gradients per segment to combine")
    check_choice(missing, MISSING, "missing")
    store = open_any(store)
    views = {name: store.select(name) for name in queries}
    train_ids, position = union_ids(list(views.values()))
    first = next(iter(views.values()))
    if missing == "error":
        for name, seg in views.items():
            if len(seg) != len(train_ids):  # ids are unique within a segment
                raise StoreError(
                    f"segment {name!r} holds other training ids than segment {first.segment!r}; "
                    "combined scores need the same examples logged in every segment, or "
                    "missing='zero' for segments that trained on different examples"
                )
    total: torch.Tensor | None = None
    query_ids: list | None = None
    used: dict[str, float] = {}
    for name, q in queries.items():
        seg = views[name]
        weight = used[name] = _weight(seg, name, weights)
        engine = InfluenceEngine(seg, **engine_options)
        result = engine.scores(q)
        if total is None:
            query_ids = list(result.query_ids)
            total = torch.zeros(result.values.shape[0], len(train_ids), dtype=torch.float64)
        if list(result.query_ids) != query_ids:
            raise ValueError(
                f"segment {name!r}: its queries have other ids than the first "
                "segment's; capture the same query examples at every checkpoint"
            )
        columns = torch.tensor([position[t] for t in result.train_ids], dtype=torch.long)
        total[:, columns] += weight * result.values.to(torch.float64)
    meta = {
        "segments": list(queries),
        "weights": used,
        "missing": missing,
        "preconditioner": engine.preconditioner.kind,
        "damping": engine.damping,
    }
    return Scores(total.to(torch.float32), query_ids, train_ids, engine.mode, None, meta)


def _weight(segment_store, name: str, weights: dict[str, float] | None) -> float:
    """The weight of segment `name` (`segment_store` is the store with it selected)."""
    if weights is not None:
        if name not in weights:
            raise ValueError(f"weights has no entry for segment {name!r}")
        return float(weights[name])
    lr = segment_store.segment_meta.get("lr")
    if lr is None:
        raise ValueError(
            f"segment {name!r} has no logged learning rate: pass weights=..., or log "
            "it with run.start_segment(name, lr=...)"
        )
    return float(lr)
