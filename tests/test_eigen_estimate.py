"""Before a long float64 eigendecomposition starts, a one-line notice gives the block count,
widths and an estimated time (finite, positive, growing as w³)."""

from __future__ import annotations

import math
import re
import warnings

import torch
from query_helpers import build_store

import logix.curvature.eigen as eigen
from logix.curvature.precondition import build_preconditioner
from logix.store.format import ModuleInfo
from logix.store.reader import open_store

# One 600-wide block (40 inputs with bias × 15 outputs): wider than the timed probe.
WIDE = [ModuleInfo("wide", "Linear", 40, 15, 40, 15, True, 0)]


def wide_store(tmp_path):
    rows = torch.randn(12, 600, generator=torch.Generator().manual_seed(0))
    return open_store(build_store(tmp_path / "run", WIDE, rows))


def test_estimate_is_finite_positive_and_cubic_in_the_width():
    one = eigen.eigh_seconds([1000])
    assert math.isfinite(one) and one > 0
    assert math.isclose(eigen.eigh_seconds([2000]), 8 * one, rel_tol=1e-12)
    assert math.isclose(eigen.eigh_seconds([1000, 1000, 2000]), 10 * one, rel_tol=1e-12)


def test_a_wide_block_is_announced_with_count_widths_and_time(tmp_path, monkeypatch):
    monkeypatch.setattr(eigen, "NOTICE_SECONDS", 0.0)  # announce even a short one
    store = wide_store(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_preconditioner(store, "raw", 0.1, form="eigen")
    notices = [str(w.message) for w in caught if "eigendecomposing" in str(w.message)]
    assert len(notices) == 1, notices
    assert "1 curvature block(s)" in notices[0] and "1 × 600" in notices[0]
    seconds = float(re.search(r"about ([0-9.eE+-]+) s estimated", notices[0]).group(1))
    assert math.isfinite(seconds) and seconds > 0
    with warnings.catch_warnings(record=True) as caught:  # cached: nothing starts, no notice
        warnings.simplefilter("always")
        build_preconditioner(store, "raw", 1.0, form="eigen")
    assert not [w for w in caught if "eigendecomposing" in str(w.message)]


def test_short_or_narrow_eigendecompositions_are_not_announced(tmp_path):
    assert eigen.announce_eigh([24, 15]) is None  # narrower than the probe: not even timed
    store = wide_store(tmp_path)  # 600 wide: well under NOTICE_SECONDS here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_preconditioner(store, "raw", 0.1, form="eigen")
    assert eigen.eigh_seconds([600]) < eigen.NOTICE_SECONDS
    assert not [w for w in caught if "eigendecomposing" in str(w.message)]
