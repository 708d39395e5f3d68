"""Evaluation of attribution quality: the linear datamodeling score (LDS), multi-seed and single-model."""

from logix.eval.lds import (
    LDSResult,
    bootstrap_ci,
    lds,
    rankdata,
    retrain_outputs,
    sample_subsets,
    spearman,
)
from logix.eval.single_model import drop_subsets, single_model_lds, single_model_outputs

__all__ = [
    "LDSResult",
    "bootstrap_ci",
    "lds",
    "rankdata",
    "retrain_outputs",
    "sample_subsets",
    "spearman",
    "drop_subsets",
    "single_model_lds",
    "single_model_outputs",
]
