"""Data ids: the caller's ints or strings, checked once at the batch that brings them.

Ids are written as JSON into each shard's header, so they are bounded: an id longer than
`MAX_ID_CHARS` characters (or an int outside 64 bits) is refused at `run(data_id=...)`, and the
writer cuts a shard before its ids' JSON reaches `MAX_SHARD_ID_BYTES`; every shard header stays
below the reader's cap (`format.MAX_HEADER_BYTES`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from logix.errors import StoreError
from logix.store.format import parse_json

DataId = int | str
MAX_ID_CHARS = 1024  # characters of one string id
MAX_SHARD_ID_BYTES = 16 << 20  # JSON bytes of one shard's ids (the header cap is 100 MiB)
_INT_LIMIT = 2**63


def normalise_ids(ids: Sequence[Any]) -> list[DataId]:
    """Data ids as python ints or strs; numpy / 0-d torch integers become int."""
    if isinstance(ids, (str, bytes)):
        raise StoreError(f"data ids must be a sequence of ids, got the single string {ids!r}")
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist() if ids.ndim else [ids.item()]
    kinds = set(map(type, ids))
    if kinds == {int}:  # the common case, checked with two C-level passes (no Python per id)
        out = list(ids)
        if not -_INT_LIMIT <= min(out) <= max(out) < _INT_LIMIT:
            check_id_bounds(out)  # raises, naming an id outside 64 bits
        return out
    if kinds == {str}:  # without a conversion per id
        out = list(ids)
    else:
        out = [_one_id(i) for i in ids]
        check_one_kind(out, "this batch")
    check_id_bounds(out)
    return out


def check_one_kind(ids: list[DataId], where: str, expected: type | None = None) -> None:
    """Refuse ids of two kinds: a store holds int ids or string ids, never both, since 1 and
    '1' would be two different examples (`expected`: the kind the store already holds)."""
    kinds = {type(i) for i in ids}
    if expected is not None:
        kinds.add(expected)
    if len(kinds) > 1:
        ints = next(i for i in ids if isinstance(i, int)) if expected is not int else None
        strs = next(i for i in ids if isinstance(i, str)) if expected is not str else None
        held = f" (the store holds {expected.__name__} ids)" if expected is not None else ""
        example = ", ".join(repr(i) for i in (ints, strs) if i is not None)
        raise StoreError(
            f"{where} mixes int and string data ids{held}, e.g. {example}: one store holds one "
            "kind of id, since 1 and '1' would be two different examples. Convert the ids to one "
            "kind (e.g. str(i) for every id, or int(i)), or log into another run directory"
        )


def stored_ids(text: str, where: str) -> list[DataId]:
    """The data ids of a shard header (its metadata's JSON list), checked: ints or strings,
    of one kind; a StoreError naming `where` otherwise."""
    ids = parse_json(text, f"the data ids of {where}")
    if not isinstance(ids, list) or not all(type(i) in (int, str) for i in ids):
        raise StoreError(f"{where} has damaged data ids (not a list of ints or strings)")
    check_one_kind(ids, where)
    return ids


def _one_id(i: Any) -> DataId:
    if isinstance(i, torch.Tensor) and i.ndim == 0 and not i.is_floating_point() and i.dtype != torch.bool:
        i = int(i.item())
    elif isinstance(i, np.integer):
        i = int(i)
    elif isinstance(i, str):
        i = str(i)  # np.str_ -> str
    if isinstance(i, bool) or not isinstance(i, (int, str)):
        raise StoreError(f"data id {i!r} ({type(i).__name__}) is not valid: use ints or strings")
    return i


def check_id_bounds(ids: list[DataId]) -> None:
    """Refuse ids that would make a shard header unreadable (too long) before anything is kept."""
    if not ids:
        return
    if isinstance(ids[0], str) or not all(isinstance(i, int) for i in ids):
        longest = max((i for i in ids if isinstance(i, str)), key=len, default="")
        if len(longest) > MAX_ID_CHARS:
            raise StoreError(
                f"data id {longest[:40]!r}... has {len(longest)} characters; ids may have at most "
                f"{MAX_ID_CHARS} (they are stored in every shard's header): use a shorter key, "
                "e.g. an index or a hash of the text"
            )
    ints = [i for i in ids if isinstance(i, int)]
    if ints and not -_INT_LIMIT <= min(ints) <= max(ints) < _INT_LIMIT:
        raise StoreError(
            f"integer data ids must fit in 64 bits (|id| < 2**63); got one outside, e.g. {max(ints, key=abs)}"
        )


def id_json_bound(i: DataId) -> int:
    """At most the bytes one id takes in a shard header's JSON list (ASCII-escaped: a character
    takes up to 12 bytes, plus quotes and the separator)."""
    return 22 if isinstance(i, int) else 12 * len(i) + 4


def batch_ids(data_id: Any) -> list[DataId]:
    """The ids of one batch: a single int or str is a batch of one; never empty."""
    if isinstance(data_id, (int, str)) and not isinstance(data_id, bool):
        data_id = [data_id]
    ids = normalise_ids(data_id)
    if not ids:
        raise ValueError("data_id is empty: pass one id per example of the batch")
    return ids
