"""Evaluation of attribution quality: the linear datamodeling score (LDS)."""

from logix.eval.lds import (
    LDSResult,
    bootstrap_ci,
    lds,
    rankdata,
    retrain_outputs,
    sample_subsets,
    spearman,
)

__all__ = ["LDSResult", "bootstrap_ci", "lds", "rankdata", "retrain_outputs", "sample_subsets", "spearman"]
