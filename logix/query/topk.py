"""Running top-k over streamed chunks of scores, exact and stable (ties to the lower train index).

Each (float32 score, train index) pair is packed into one int64 key ordered like (score ↓,
index ↑), so a `torch.topk` of keys is exactly a stable descending argsort of the scores, and
per-chunk results (or per-rank results, `query/distributed.py: merge_top_k`) merge with one
more top-k.
"""

from __future__ import annotations

import torch

INDEX_BITS = 32  # low bits of a key: the inverted train index; high bits: the ordered score


def new_best(n_query: int, device: torch.device) -> torch.Tensor:
    """An empty running top-k: [n_query, 0] int64 keys."""
    return torch.empty((n_query, 0), dtype=torch.long, device=device)


def update_best(best: torch.Tensor, scores: torch.Tensor, start: int, k: int) -> torch.Tensor:
    """The k best keys of `best` [n, ≤ k] and a chunk's `scores` [n, c] of train rows start, …"""
    keys = torch.cat([best, candidates(scores, start, k)], dim=1)
    return torch.topk(keys, min(k, keys.shape[1]), dim=1).values


def candidates(s: torch.Tensor, start: int, k: int) -> torch.Tensor:
    """Packed keys of a chunk's entries that can enter the top-k: [n, ≤ c] int64.

    A float top-(k+1) finds each row's k best; only when the (k+1)-th ties with the k-th (so
    the float top-k's choice among equal scores is arbitrary) is the whole chunk packed.
    """
    if s.shape[1] <= k:
        return pack(s, start)
    values, index = torch.topk(s, k + 1, dim=1)
    if bool((values[:, k] == values[:, k - 1]).any()):
        return pack(s, start)
    return pack(values[:, :k], start, index[:, :k] + start)


def pack(values: torch.Tensor, start: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [n, c] of train rows `index` -> distinct int64 keys ordered like (score ↓, index ↑).

    The high 32 bits are the float32 score mapped to an order-preserving int32 (negative floats
    get their magnitude bits flipped), the low 32 bits the inverted train index.
    """
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    if index is None:  # the columns are the rows start, start + 1, ...
        index = torch.arange(start, start + values.shape[1], device=values.device)
    return (ordered << INDEX_BITS) | ((1 << INDEX_BITS) - 1 - index)


def unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack`: (scores float32, train indices int64)."""
    ordered = keys >> INDEX_BITS  # arithmetic shift keeps the sign
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    index = (1 << INDEX_BITS) - 1 - (keys & ((1 << INDEX_BITS) - 1))
    return bits.to(torch.int32).view(torch.float32), index
