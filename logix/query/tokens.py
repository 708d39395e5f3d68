"""Token-level attribution: split a training sequence's influence on a query over its positions.

A sequence's projected gradient is G̃_n = Σ_t g̃_t x̃_tᵀ per module m, so its influence is exactly

    I(q, n) = Σ_t s_t,    s_t = Σ_m g̃_{t,m}ᵀ Q'_m x̃_{t,m}

with Q'_m = the preconditioned query block [r_out, r_in] (the same Q' as `InfluenceEngine.scores`).
s_t is computed as a batched contraction (g̃ᵀ Q', then a dot with x̃, or Q' x̃ then a dot with g̃,
whichever leaves the smaller rank); the [T, r_out, r_in] outer products never exist. A one-hot
input (an Embedding kept whole) is scored by gathering the columns Q'[:, :, token].

What s_t means: the term of position t in every watched layer. It is an exact decomposition of
the sequence's score, not the effect of deleting token t: attention mixes positions, so the
layer input x̃_t already depends on earlier tokens and g̃_t on later losses. In a causal LM
whose loss at position t predicts token t+1, the output head's term at position t belongs to
that prediction, while an input Embedding's term at t belongs to token t itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from logix.capture.tokens import PositionFactors, TokenGradients
from logix.errors import StoreError
from logix.query.results import _no_data_ids
from logix.store.ids import DataId

_BUDGET = 1 << 24  # elements of the largest intermediate (64 MB in float32)


@dataclass
class TokenScores:
    """values: [n_query, n_docs, T] (or [n_modules, n_query, n_docs, T] with `modules` set);
    positions beyond a sequence's length and masked positions are 0. token_ids / mask:
    [n_docs, T] as captured (or None). values.sum(-1) is the sequence score of the same mode."""

    values: torch.Tensor
    query_ids: list[DataId]
    train_ids: list[DataId]  # the documents', as every result names its training examples' ids
    token_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    mode: str = "dot"
    modules: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    data_ids = property(lambda self: _no_data_ids(self))

    def numpy(self):
        return self.values.cpu().numpy()

    def sequence_scores(self) -> torch.Tensor:
        """[n_query, n_docs]: the per-position scores summed (= `InfluenceEngine.scores`)."""
        total = self.values if self.modules is None else self.values.sum(0)
        return total.sum(-1)

    def for_query(self, query: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores [n_docs, T], token ids [n_docs, T] or None) of the query at index `query`."""
        total = self.values if self.modules is None else self.values.sum(0)
        return total[query], self.token_ids

    def top_tokens(self, query: int, doc: int, k: int = 5) -> list[tuple[int, int | None, float]]:
        """The k positions of document index `doc` with the largest scores for query index
        `query`, best first: (position, token id or None, score). Masked positions are skipped."""
        scores, tokens = self.for_query(query)
        row = scores[doc].clone()
        if self.mask is not None and self.mask.shape[1] == row.shape[0]:
            row[self.mask[doc] == 0] = float("-inf")
        order = torch.sort(row, descending=True, stable=True).indices[: int(k)]
        return [
            (p, None if tokens is None else int(tokens[doc, p]), float(row[p]))
            for p in order.tolist()
            if row[p] != float("-inf")
        ]


def token_scores(
    engine: Any, q: Any, tokens: TokenGradients, mode: str = "dot", per_module: bool = False
) -> TokenScores:
    """Per-position scores of `tokens`' sequences against the queries `q` (see the module doc).

    engine: an `InfluenceEngine` (its preconditioner, modules and device are used); mode: dot,
    cosine or relative (each position's term divided by the sequence's norms, so the positions
    still sum to the sequence's score in that mode).
    """
    qp, qnorm, qids = engine._shared_queries(q)  # Q' [n_query, D] float32, norms [n_query]
    values, selected = position_terms(engine, qp, tokens, per_module)
    if mode != "dot":
        rows = tokens.gradients().values.to(engine.device)
        denom = engine.preconditioner.quadratic(rows).sqrt().cpu()[None, :]  # [1, n_docs]
        if mode == "cosine":
            denom = qnorm.cpu()[:, None] * denom
        values = torch.where(denom[..., None] > 0, values / denom[..., None], torch.zeros_like(values))
    return TokenScores(
        values,
        qids,
        list(tokens.data_ids),
        tokens.token_ids,
        tokens.mask,
        mode,
        [m.name for m in selected] if per_module else None,
        engine._meta(),
    )


def position_terms(
    engine: Any, qp: torch.Tensor, tokens: TokenGradients, per_module: bool = False
) -> tuple[torch.Tensor, list]:
    """The dot-mode terms s_t of the prepared queries Q' [n_query, D] (`engine._shared_queries`):
    ([n_query, n_docs, T] or [n_modules, ...] with per_module, the modules they cover)."""
    if not isinstance(tokens, TokenGradients):
        raise TypeError(
            "token gradients must come from a query run's token_gradients() "
            f"(`with query(data_id=ids, per_token=True)`), got {type(tokens).__name__}"
        )
    store = engine.store
    if tokens.fingerprint != store.fingerprint or list(tokens.modules) != list(store.modules):
        raise StoreError(
            "the token gradients were captured with other projections or another "
            f"model than the store {store.path}: capture them with "
            f"logix.init({str(store.path)!r}, mode='query') on this run's model"
        )
    selected = [m for m in engine._selected if m.name in tokens.factors]
    if not selected:
        raise ValueError("no selected module was reached in the per-token capture")
    lengths = {m.name: tokens.factors[m.name].positions for m in selected}
    if not per_module and len(set(lengths.values())) > 1:
        raise ValueError(
            f"the selected modules have different numbers of positions {lengths} (e.g. Conv2d "
            "layers of different resolutions), so their terms cannot be added per position: "
            "pass per_module=True, or choose modules of one length with the engine's modules=[...]"
        )
    t = max(lengths.values())
    parts = []
    for m in selected:
        qm = qp[:, m.columns].reshape(-1, m.r_out, m.r_in)
        s = _module_scores(qm, tokens.factors[m.name], engine.device)
        parts.append(torch.nn.functional.pad(s, (0, t - s.shape[-1])))
    return (torch.stack(parts) if per_module else torch.stack(parts).sum(0)), selected


def _module_scores(qm: torch.Tensor, f: PositionFactors, device: torch.device) -> torch.Tensor:
    """s[q, n, t] = Σ_k g̃_{n,k,t}ᵀ Q'_q x̃_{n,k,t}: [n_query, n, T] float32 on the CPU.

    qm: [n_query, r_out, r_in] on `device`; positions are processed in blocks so that the
    largest intermediate stays under _BUDGET elements."""
    n, k, t, r_out = f.g.shape
    n_query, _, r_in = qm.shape
    positions = n * k * t
    out = torch.zeros(n_query, positions)
    g = f.g.reshape(positions, r_out)
    if f.one_hot:
        index, weight = f.index.reshape(positions), f.weight.reshape(positions)
        step = max(1, _BUDGET // max(1, n_query * r_out))
        for a in range(0, positions, step):
            gb = g[a : a + step].to(device)
            cols = qm[:, :, index[a : a + step].to(device)]  # [n_query, r_out, p]: Q' e_token
            s = torch.einsum("qop,po->qp", cols, gb) * weight[a : a + step].to(device)
            out[:, a : a + step] = s.cpu()
    else:
        x = f.x.reshape(positions, r_in)
        keep_in = r_in <= r_out  # contract the larger side first; the intermediate keeps the smaller
        mat = (
            qm.permute(1, 0, 2).reshape(r_out, n_query * r_in)
            if keep_in
            else qm.permute(2, 0, 1).reshape(r_in, n_query * r_out)
        )
        step = max(1, _BUDGET // max(1, n_query * min(r_in, r_out)))
        for a in range(0, positions, step):
            gb, xb = g[a : a + step].to(device), x[a : a + step].to(device)
            if keep_in:  # (g̃ᵀ Q') x̃
                h = (gb @ mat).view(-1, n_query, r_in)
                s = torch.bmm(h, xb[:, :, None])[..., 0]
            else:  # g̃ᵀ (Q' x̃)
                h = (xb @ mat).view(-1, n_query, r_out)
                s = torch.bmm(h, gb[:, :, None])[..., 0]
            out[:, a : a + step] = s.T.cpu()
    return out.view(n_query, n, k, t).sum(2)
