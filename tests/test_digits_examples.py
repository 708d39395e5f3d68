"""Smoke tests: the two-stage and proxy-model digits examples run end to end on a tiny setting."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))

import proxy
import two_stage


def test_two_stage_runs_and_scores_every_method(tmp_path):
    out = two_stage.main(
        [
            "--subsets",
            "4",
            "--seeds",
            "1",
            "--n-test",
            "6",
            "--n-stage2",
            "40",
            "--epochs1",
            "2",
            "--epochs2",
            "2",
            "--segments",
            "2",
            "--rank",
            "4",
            "--dampings",
            "0.1",
            "--out",
            str(tmp_path),
        ]
    )
    n_train = 1397
    assert len(out["ids"]) == n_train and out["ids"][0] == "s1:0" and out["ids"][-1] == "s2:39"
    methods = set(out["results"])
    assert {
        "SOURCE λ=0.1",
        "influence, final-s2 λ=0.1",
        "influence, final-all λ=0.1",
        "TracIn-CP (η_eff·K/N)",
    } <= methods
    for s in out["scores"].values():
        assert s.shape == (6, n_train)
    assert float(out["scores"]["influence, final-s2 λ=0.1"][:, : n_train - 40].abs().max()) == 0.0
    source = out["results"]["SOURCE λ=0.1"]
    assert source["stage2"].n_subsets == 4 and not math.isnan(source["both"].mean)
    with pytest.raises(ValueError, match="segments per stage"):
        two_stage.segment_bounds(2, 3)
    assert two_stage.segment_bounds(5, 2) == [(0, 2), (2, 5)]


def test_proxy_runs_with_the_full_models_ground_truth(tmp_path):
    out = proxy.main(
        [
            "--subsets",
            "3",
            "--seeds",
            "1",
            "--n-test",
            "5",
            "--epochs",
            "1",
            "--hidden",
            "8",
            "--rank",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    full = out["results"]["full model (hidden 256)"]
    assert float(full["spearman"].mean()) == pytest.approx(1.0)
    assert float(full["overlap"].mean()) == 1.0
    assert "proxy, hidden 8" in out["results"]
    assert (tmp_path / "retrain-epochs1-test5").is_dir()  # the cache lds.py shares
