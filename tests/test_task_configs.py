"""The shipped task configurations load and say what the README recommends."""

from __future__ import annotations

from pathlib import Path

from logix.config import LogixConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_retrieval_config_whitens_and_uses_cosine():
    cfg = LogixConfig.from_yaml(CONFIGS / "retrieval.yaml")
    want = ("kfac-whitened", "identity", "cosine")
    assert (cfg.projection.kind, cfg.query.preconditioner, cfg.query.mode) == want
    assert 0 < cfg.projection.damping <= 1e-3


def test_counterfactual_config_uses_pca_and_raw():
    cfg = LogixConfig.from_yaml(CONFIGS / "counterfactual.yaml")
    assert (cfg.projection.kind, cfg.query.preconditioner, cfg.query.mode) == ("pca", "raw", "dot")
