"""Token-level re-ranking: find the statement inside a document, not the document's bulk.

A document's gradient is dominated by the tokens the model has not memorised (names, filler);
the few positions that state a fact contribute little to the store-wide score. Re-ranking takes
each query's top `candidates` by that score, recomputes their per-position terms with the model
(`InfluenceEngine.token_scores`: nothing extra is stored) and ranks them by their best window:

    score(q, n) = max_s Σ_{t=s}^{s+w-1} s_t(q, n)      (s_t: the position terms of `mode`)

over windows of `window` consecutive real positions (a sequence shorter than the window is one
window; sequences are right-padded: a mask's count is the length). The result is the usual
`TopK`, with `positions[i, j] = (start, stop)` of the window that carries each score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from logix.capture.tokens import TokenGradients
from logix.query.results import TopK
from logix.store.gradients import DataId, Gradients
from logix.vocabulary import SCORE_MODES, check_choice

Recompute = Callable[[list[DataId]], TokenGradients]


def best_windows(
    terms: torch.Tensor, lengths: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """terms [..., n, T] (position terms), lengths [n] (real positions, from the start): the best
    window sum [..., n] and its start [..., n]; a sequence shorter than `window` is one window."""
    t = terms.shape[-1]
    w = min(int(window), t)
    csum = torch.nn.functional.pad(terms.double().cumsum(-1), (1, 0))  # [..., n, T + 1]
    sums = csum[..., w:] - csum[..., :-w]  # [..., n, T - w + 1]: the window starting at s
    starts = torch.arange(sums.shape[-1])
    valid = starts[None, :] + w <= lengths.clamp_min(w)[:, None]  # [n, T - w + 1]
    sums = sums.masked_fill(~valid, float("-inf"))
    best, start = sums.max(-1)
    return best, start


def rerank_top_k(
    engine,
    q: Gradients,
    k: int,
    recompute: Recompute,
    *,
    candidates: int = 100,
    window: int = 1,
    mode: str = "cosine",
    query_batch: int = 32,
) -> TopK:
    """The top `k` (at most `candidates`) of each query's `candidates` best store rows (by
    `engine.top_k(q, mode=mode)`), re-ranked by their best window of `window` positions.

    recompute(ids) must return the per-position gradients of the training sequences with those
    data ids (a query-mode run's `token_gradients()` after `per_token=True` blocks over them, in
    any order); it is called once per group of `query_batch` queries with the union of their
    candidates. Returns `TopK` with `positions` [n_query, k, 2] (start, stop) per entry."""
    check_choice(mode, SCORE_MODES, "mode")
    if int(window) < 1:
        raise ValueError(f"window must be at least 1 position, got {window}")
    first = engine.top_k(q, k=int(candidates), mode=mode)
    k = min(int(k), first.indices.shape[1])
    values, indices, ids, spans = [], [], [], []
    for a in range(0, len(first.query_ids), int(query_batch)):
        sub = replace(q, values=q.values[a : a + query_batch], data_ids=list(q.data_ids[a : a + query_batch]))
        cand = first.indices[a : a + query_batch]  # [nq, c] store row indices
        union = sorted(set(cand.flatten().tolist()))
        union_ids = [engine.store.data_ids[i] for i in union]
        tokens = recompute(union_ids)
        where = {d: j for j, d in enumerate(tokens.data_ids)}
        missing = [d for d in union_ids if d not in where]
        if missing:
            raise ValueError(f"recompute returned no per-token gradients for data ids {missing[:5]}")
        ts = engine.token_scores(sub, tokens, mode=mode)  # values [nq, n_tok, T]
        lengths = _lengths(tokens, ts.values.shape[-1])
        best, start = best_windows(ts.values, lengths, window)  # [nq, n_tok]
        column = torch.tensor(
            [[where[engine.store.data_ids[i]] for i in row] for row in cand.tolist()], dtype=torch.long
        ).reshape(cand.shape)
        score = best.gather(1, column)  # [nq, c]
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
        values.append(score.gather(1, order).float())
        indices.append(cand.gather(1, order))
        s = start.gather(1, column).gather(1, order)
        w = torch.minimum(torch.full_like(s, int(window)), lengths[column.gather(1, order)])
        spans.append(torch.stack([s, s + w], dim=-1))
    idx = torch.cat(indices)
    for row in idx.tolist():
        ids.append([engine.store.data_ids[i] for i in row])
    meta = {**first.meta, "rerank": {"candidates": int(first.indices.shape[1]), "window": int(window)}}
    return TopK(torch.cat(values), idx, ids, first.query_ids, mode, meta, positions=torch.cat(spans))


def _lengths(tokens: TokenGradients, t: int) -> torch.Tensor:
    """Real positions per sequence [n]: the mask's count, or every captured position."""
    if tokens.mask is not None:
        return tokens.mask.sum(1).long()
    return torch.full((len(tokens.data_ids),), t, dtype=torch.long)
