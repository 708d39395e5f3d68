"""Token-level re-ranking: find the statement inside a document, not the document's bulk.

A document's gradient is dominated by the tokens the model has not memorised (names, filler);
the few positions that state a fact contribute little to the store-wide score. Re-ranking takes
each query's top `candidates` by that score, recomputes their per-position gradients with the
model (`query.token_gradients()`: nothing extra is stored) and ranks them by their best window
of `window` consecutive real positions. With the window's gradient G_{n,s} = Σ_{t=s}^{s+w-1} g̃_t x̃_tᵀ:

    norm="window"    score(q, n) = max_s ⟨q, (F+λI)⁻¹ G_{n,s}⟩ / (‖q‖ ‖G_{n,s}‖)   (cosine)
    norm="sequence"  score(q, n) = max_s Σ_{t=s}^{s+w-1} s_t(q, n)   (s_t: `token_scores` of mode)

"window" (the default) scores the statement as if it were the whole document, so a memorised
fact whose gradient is small still counts; "sequence" keeps each window's share of the
document's score (the norms are the whole sequence's). In `relative` mode the query norm is
left out, in `dot` mode both reductions are the window's dot product. A sequence shorter than the
window is one window; sequences are right-padded (a mask's count is the length). The result is
the usual `TopK`, with `positions[i, j] = (start, stop)` of the window that carries each score.
`engine.top_k(q, k, rerank=Rerank(recompute, ...))` is the same call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from logix.capture.tokens import PositionFactors, TokenGradients
from logix.curvature.gram import GramBlock
from logix.curvature.kfac import KroneckerBlock
from logix.query.results import TopK
from logix.query.tokens import position_terms
from logix.store.gradients import Gradients
from logix.store.ids import DataId
from logix.vocabulary import RERANK_NORMS, SCORE_MODES, check_choice

Recompute = Callable[[list[DataId]], TokenGradients]
_BUDGET = 1 << 24  # elements of the window rows built at once (64 MB in float32)


@dataclass(frozen=True)
class Rerank:
    """How `InfluenceEngine.top_k` re-ranks its candidates (see the module doc): recompute(ids)
    returns the per-position gradients of those data ids (`query.token_gradients()` of
    `per_token=True` blocks over them, in any order)."""

    recompute: Recompute
    candidates: int = 100
    window: int = 1
    norm: str = "window"
    query_batch: int = 32

    def top_k(self, engine, q: Gradients, k: int, mode: str = "cosine") -> TopK:
        """`rerank_top_k` with these settings."""
        return rerank_top_k(
            engine,
            q,
            k,
            self.recompute,
            candidates=self.candidates,
            window=self.window,
            mode=mode,
            norm=self.norm,
            query_batch=self.query_batch,
        )


def window_sums(terms: torch.Tensor, window: int) -> torch.Tensor:
    """terms [..., n, T] (position terms) -> Σ_{t=s}^{s+w-1} terms_t [..., n, T - w + 1] float64,
    w = min(window, T)."""
    w = min(int(window), terms.shape[-1])
    csum = torch.nn.functional.pad(terms.double().cumsum(-1), (1, 0))  # [..., n, T + 1]
    return csum[..., w:] - csum[..., :-w]


def best_windows(
    scores: torch.Tensor, lengths: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [..., n, T - w + 1] of the windows starting at each s, lengths [n] (real positions,
    from the start): the best score [..., n] and its start [..., n] among the windows inside the
    sequence (a sequence shorter than the window is its first window)."""
    w = int(window)
    starts = torch.arange(scores.shape[-1])
    valid = starts[None, :] + w <= lengths.clamp_min(w)[:, None]  # [n, T - w + 1]
    return scores.masked_fill(~valid, float("-inf")).max(-1)


def rerank_top_k(
    engine,
    q: Gradients,
    k: int,
    recompute: Recompute,
    *,
    candidates: int = 100,
    window: int = 1,
    mode: str = "cosine",
    norm: str = "window",
    query_batch: int = 32,
) -> TopK:
    """The top `k` (at most `candidates`) of each query's `candidates` best store rows (by
    `engine.top_k(q, mode=mode)`), re-ranked by their best window of `window` positions.

    recompute(ids) must return the per-position gradients of the training sequences with those
    data ids (a query-mode run's `token_gradients()` after `per_token=True` blocks over them, in
    any order); it is called once per group of `query_batch` queries with the union of their
    candidates. Returns `TopK` with `positions` [n_query, k, 2] (start, stop) per entry."""
    check_choice(mode, SCORE_MODES, "mode")
    check_choice(norm, RERANK_NORMS, "rerank norm")
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
        if norm == "sequence" or mode == "dot":
            terms = engine.token_scores(sub, tokens, mode=mode).values  # [nq, n_tok, T]
        else:  # the window's own norms: dot terms, from queries preconditioned once
            qp, qnorm, _ = engine._shared_queries(sub)
            terms = position_terms(engine, qp, tokens)[0]
        t = terms.shape[-1]
        w = min(int(window), t)
        scores = window_sums(terms, w)  # [nq, n_tok, T - w + 1]
        if norm == "window" and mode != "dot":
            scores = _over_window_norms(scores, engine, tokens, w, qnorm if mode == "cosine" else None)
        lengths = _lengths(tokens, t)
        best, start = best_windows(scores, lengths, w)  # [nq, n_tok]
        column = torch.tensor(
            [[where[engine.store.data_ids[i]] for i in row] for row in cand.tolist()], dtype=torch.long
        ).reshape(cand.shape)
        score = best.gather(1, column)  # [nq, c]
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
        values.append(score.gather(1, order).float())
        indices.append(cand.gather(1, order))
        s = start.gather(1, column).gather(1, order)
        width = torch.minimum(torch.full_like(s, int(window)), lengths[column.gather(1, order)])
        spans.append(torch.stack([s, s + width], dim=-1))
    idx = torch.cat(indices)
    for row in idx.tolist():
        ids.append([engine.store.data_ids[i] for i in row])
    meta = {
        **first.meta,
        "rerank": {"candidates": int(first.indices.shape[1]), "window": int(window), "norm": norm},
    }
    return TopK(torch.cat(values), idx, ids, first.query_ids, mode, meta, positions=torch.cat(spans))


def _over_window_norms(
    sums: torch.Tensor, engine, tokens: TokenGradients, window: int, qnorm: torch.Tensor | None
) -> torch.Tensor:
    """Window dot products sums [nq, n, T - w + 1] divided by each window's own norm
    √(Gᵀ(F+λI)⁻¹G) and by the query norms qnorm [nq] if given (cosine); 0 where a norm is 0."""
    t = sums.shape[-1] + window - 1
    denom = window_norms(engine, tokens, window, t)[None]  # [1, n, nw]
    if qnorm is not None:
        denom = denom * qnorm.double().cpu()[:, None, None]
    return torch.where(denom > 0, sums / denom.clamp_min(1e-300), torch.zeros_like(sums))


def window_norms(engine, tokens: TokenGradients, window: int, t: int) -> torch.Tensor:
    """√(G_sᵀ (F+λI)⁻¹ G_s) [n, T - w + 1] (float64) of every window's gradient G_s, in the
    engine's metric over its selected modules, a few sequences at a time.

    identity / kfac / ekfac blocks rotate the per-position factors into the eigenbases first
    (Q_Sᵀ G_s Q_A = Σ_t (Q_Sᵀ g̃_t)(Q_Aᵀ x̃_t)ᵀ), so no window's row is ever rotated whole;
    raw and Gram blocks whiten the window's rows."""
    pre, device = engine.preconditioner, engine.device
    blocks = pre.blocks_on(device, torch.float32)
    n, nw = len(tokens), t - window + 1
    out = torch.zeros(n, nw, dtype=torch.float64)
    widest = max((m.width for m in pre.selected), default=1)
    step = max(1, _BUDGET // max(1, nw * widest))
    for m in pre.selected:
        f = tokens.factors.get(m.name)
        if f is None:
            continue
        b = None if blocks is None else blocks[m.name]
        for a in range(0, n, step):
            part = f.select(torch.arange(a, min(n, a + step))).padded(f.g.shape[1], t)
            if not part.one_hot and (b is None or isinstance(b, KroneckerBlock)):
                g, x = part.g.to(device), part.x.to(device)
                if b is not None:
                    g, x = g @ b.q_out, x @ b.q_in
                win = _windows(g, x, window).square_()  # [n_part, nw, r_out, r_in], rotated
                if b is None:
                    quad = win.sum((-1, -2)).reshape(-1)
                else:  # Σ_ij W_ij² / (Λ_ij + λ): one product with the flattened inverse
                    inverse = (b.eigenvalues + b.damping).reciprocal().reshape(-1)
                    quad = win.reshape(-1, m.width) @ inverse
            else:
                rows = module_windows(part, window).reshape(-1, m.width).to(device)
                if isinstance(b, GramBlock):
                    quad = b.quadratic(rows)
                else:
                    quad = (rows if b is None else b.whiten(rows)).pow(2).sum(1)
            out[a : a + len(part.g)] += quad.double().cpu().reshape(-1, nw)
    return out.clamp_min(0).sqrt()


def module_windows(f: PositionFactors, window: int) -> torch.Tensor:
    """[n, T - w + 1, r_out, r_in]: one module's window gradients (T: f's positions)."""
    if not f.one_hot:
        return _windows(f.g, f.x, window)
    n, _, t, _ = f.g.shape
    out = []
    for s in range(t - window + 1):  # the outer products are vocabulary-wide: one masked sum each
        keep = torch.zeros(t)
        keep[s : s + window] = 1.0
        one = PositionFactors(f.g * keep[None, None, :, None], None, f.index, f.weight, f.r_in)
        out.append(one.sequence_gradient())
    return torch.stack(out, dim=1)


def _windows(g: torch.Tensor, x: torch.Tensor, window: int) -> torch.Tensor:
    """g [n, K, T, r_out], x [n, K, T, r_in] -> Σ_{t=s}^{s+w-1} Σ_k g_t x_tᵀ [n, T - w + 1, r_out, r_in]."""
    outer = torch.einsum("nktr,nkts->ntrs", g, x)
    if window == 1:
        return outer
    nw = outer.shape[1] - window + 1
    return sum(outer[:, j : j + nw] for j in range(window))  # no cumsum: tiny windows stay exact


def _lengths(tokens: TokenGradients, t: int) -> torch.Tensor:
    """Real positions per sequence [n]: the mask's count, or every captured position."""
    if tokens.mask is not None:
        return tokens.mask.sum(1).long()
    return torch.full((len(tokens.data_ids),), t, dtype=torch.long)
