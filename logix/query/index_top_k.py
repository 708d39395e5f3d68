"""`InfluenceEngine.top_k` answered by an approximate index: the same ids, values and `TopK`
as the exact scan for every row the index returns (see `query/index.py` for which engines)."""

from __future__ import annotations

from typing import Any

import torch

from logix.query.index import ApproximateIndex, check_engine
from logix.query.results import TopK
from logix.query.topk import pack, unpack


def index_top_k(engine: Any, index: ApproximateIndex, q: Any, k: int, mode: str) -> TopK:
    """The k best train rows per query by `index` (k ≤ len(store)), ordered like the exact
    scan (score ↓, row ↑). Values: cosine ⟨q̂, x̂⟩, relative ‖q‖·⟨q̂, x̂⟩, dot ⟨q, x⟩, from the
    indexed float32 rows. A query of norm 0 scores 0 against every row, so its top k is rows
    0..k-1, as in the exact scan. `.meta["index"]` names the index
    (kind, metric, nlist, nprobe): these results are approximate."""
    check_engine(engine, index, mode)
    index.check_store(engine.store)
    qp, qnorm, qids = engine._shared_queries(q, streamed=False, norms=True)
    qp, qnorm = qp.detach().cpu().float(), qnorm.detach().cpu().float()
    zero = qnorm == 0
    if index.metric == "cosine":
        qp = qp / torch.where(zero, torch.ones_like(qnorm), qnorm)[:, None]
    values, rows = index.search(qp.numpy(), k, engine.device)
    values, rows = torch.from_numpy(values), torch.from_numpy(rows)
    if mode == "relative":
        values = values * qnorm[:, None]
    if bool(zero.any()):  # every score is 0: the exact scan's ties go to the lowest rows
        values[zero] = 0.0
        rows[zero] = torch.arange(k, dtype=rows.dtype)
    keys = pack(values.contiguous(), 0, rows)  # the exact scan's order: score ↓, row ↑
    best_v, best_i = unpack(torch.sort(keys, dim=1, descending=True).values)
    train = engine.store.data_ids
    data_ids = [[train[j] for j in row] for row in best_i.tolist()]
    meta = {**engine._meta(), "index": index.describe()}
    return TopK(best_v, best_i, data_ids, qids, mode, meta)
