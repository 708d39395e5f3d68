"""A distributed query's share of the work: the split of a store's shards over ranks and the
merge of every rank's top-k lists, with single-process tie-breaking."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from logix.comm import all_gather_columns, check_same, rank_and_world


def split_shards(rows: list[int], world: int) -> list[tuple[int, int]]:
    """Split shards with `rows[i]` rows into `world` contiguous ranges [first, stop), balanced
    by rows: range r ends at the shard boundary nearest to (r + 1)·N / world. Contiguous
    ranges keep global row order, so rank r's rows are one column block of the score matrix."""
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    starts = [0]
    for n in rows:
        starts.append(starts[-1] + int(n))
    total = starts[-1]
    bounds = [0]
    for r in range(1, world):
        target = r * total / world
        # The boundary nearest to the target, never before the previous one.
        best = min(range(bounds[-1], len(rows) + 1), key=lambda i: (abs(starts[i] - target), i))
        bounds.append(best)
    bounds.append(len(rows))
    return [(bounds[r], bounds[r + 1]) for r in range(world)]


def local_share(store: Any) -> Any:
    """This rank's share of a `Store` view for a distributed query: a `shard_view` of the
    contiguous shard range `split_shards` gives this rank (the whole view with one rank).
    Every rank must see the same shards (checked)."""
    rank, world = rank_and_world()
    shards = [(sh["file"], int(sh["rows"])) for sh in store.shards]
    key = hashlib.blake2b(json.dumps([store.segment, shards]).encode(), digest_size=16).hexdigest()
    check_same(
        f"the shards of store {store.path}, segment {store.segment!r}",
        key,
        "open the same finished store on every rank (is logging still writing to it?)",
    )
    first, stop = split_shards([n for _, n in shards], world)[rank]
    return store.shard_view(first, stop)


def merge_top_k(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of every rank's keys [n, k_r] per row: [n, min(k, Σ k_r)], largest first.

    Keys are distinct int64 that order (score ↓, global train index ↑) (the engine's packed
    keys), so the merge is a plain top-k and breaks ties exactly like one process does."""
    return merge_keys([all_gather_columns(keys)], k)


def merge_keys(parts: list[torch.Tensor], k: int) -> torch.Tensor:
    """The k largest keys per row of the column blocks `parts` ([n, k_r] each): [n, k]."""
    keys = torch.cat(parts, dim=1)
    return torch.topk(keys, min(k, keys.shape[1]), dim=1).values
