"""Scores combined over segments (checkpoints): TracIn-CP, Σ_s w_s · I_s(q, z).

Each segment holds the training gradients at one checkpoint; the queries must be captured at
the same checkpoint (one `Gradients` per segment). A segment's weight is, by default, the
learning rate logged with it (`run.start_segment(name, lr=...)`). Segments may list the training
examples in different orders (shuffled loaders): columns are aligned by data id.
"""

from __future__ import annotations

import torch

from logix.query.engine import InfluenceEngine
from logix.query.results import Scores
from logix.store.format import StoreError
from logix.store.gradients import Gradients


def combined_scores(store, queries: dict[str, Gradients], *, mode: str = "dot",
                    preconditioner: str = "raw", damping: float = 0.1,
                    weights: dict[str, float] | None = None, **engine_options) -> Scores:
    """Σ_s weight_s · scores of segment s: `.values` [n_query, n_train] in the column order of
    the first segment given, with its `train_ids`.

    store: a `Store` (any segment selected) or a run directory; queries: segment name ->
    query gradients captured with that segment's model; weights: segment -> weight (default:
    each segment's logged `lr`, an error if one has none). Every segment must hold the same
    training ids and the queries the same query ids.
    """
    if not queries:
        raise ValueError("queries is empty: give one Gradients per segment to combine")
    if isinstance(store, str) or hasattr(store, "__fspath__"):
        from logix.store.reader import open_store

        store = open_store(store)
    total: torch.Tensor | None = None
    train_ids: list | None = None
    query_ids: list | None = None
    used: dict[str, float] = {}
    for name, q in queries.items():
        seg = store.select(name)
        weight = used[name] = _weight(seg, name, weights)
        result = InfluenceEngine(seg, preconditioner, damping, **engine_options).scores(q, mode=mode)
        if train_ids is None:
            train_ids, query_ids = list(result.train_ids), list(result.query_ids)
            position = {tid: i for i, tid in enumerate(train_ids)}
            total = torch.zeros_like(result.values, dtype=torch.float64)
        if list(result.query_ids) != query_ids:
            raise ValueError(f"segment {name!r}: its queries have other ids than the first "
                             "segment's; capture the same query examples at every checkpoint")
        if set(result.train_ids) != position.keys() or len(result.train_ids) != len(train_ids):
            raise StoreError(f"segment {name!r} holds other training ids than the first segment; "
                             "combined scores need the same examples logged in every segment")
        columns = torch.tensor([position[t] for t in result.train_ids])
        total[:, columns] += weight * result.values.to(torch.float64)
    meta = {"segments": list(queries), "weights": used,
            "preconditioner": preconditioner, "damping": damping}
    return Scores(total.to(torch.float32), query_ids, train_ids, mode, None, meta)


def _weight(segment_store, name: str, weights: dict[str, float] | None) -> float:
    """The weight of segment `name` (`segment_store` is the store with it selected)."""
    if weights is not None:
        if name not in weights:
            raise ValueError(f"weights has no entry for segment {name!r}")
        return float(weights[name])
    lr = segment_store.segment_meta.get("lr")
    if lr is None:
        raise ValueError(f"segment {name!r} has no logged learning rate: pass weights=..., or log "
                         "it with run.start_segment(name, lr=...)")
    return float(lr)
