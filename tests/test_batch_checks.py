"""The per-batch checks of the logging hot path against references computed another way: the
non-finite rows of a batch (one reduction, one scalar in the common case) against an
element-wise isfinite, and the int-id fast path of `normalise_ids` at the 64-bit bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logix.errors import StoreError
from logix.store.ids import batch_ids, normalise_ids
from logix.store.shard_io import nonfinite_rows


def _reference(rows: torch.Tensor) -> list[int]:
    return (~torch.isfinite(rows.float()).all(dim=1)).nonzero().flatten().tolist()


def _cases():
    torch.manual_seed(0)
    yield torch.randn(64, 33)
    yield torch.empty(0, 33)
    big = torch.full((64, 33), 3e38 / 33)  # every row sum finite, their total overflows
    yield big
    spread = big.clone()
    spread[7, 3] = float("inf")
    spread[9, 0] = float("-inf")  # +inf and -inf rows: a NaN total
    yield spread
    one = torch.randn(64, 33)
    one[63, 32] = float("nan")
    yield one
    yield one.to(torch.bfloat16)
    yield one.to(torch.float16)
    yield torch.randn(64, 66)[:, ::2]  # a strided view, as a shard buffer's columns are


@pytest.mark.parametrize("rows", list(_cases()), ids=lambda r: f"{tuple(r.shape)}-{r.dtype}")
def test_nonfinite_rows_matches_elementwise_isfinite(rows):
    assert nonfinite_rows(rows) == _reference(rows)


def test_int_ids_at_the_64_bit_bounds():
    edge = [2**63 - 1, -(2**63), 0]
    assert normalise_ids(edge) == edge
    for bad in (2**63, -(2**63) - 1):
        with pytest.raises(StoreError, match="64 bits"):
            batch_ids([1, bad, 2])
    assert normalise_ids([np.int64(3), 4]) == [3, 4]
    assert all(type(i) is int for i in normalise_ids(np.arange(3)))
    with pytest.raises(StoreError, match="not valid"):
        normalise_ids([True, False])
