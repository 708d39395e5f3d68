"""Evaluation of attribution quality: the linear datamodeling score (LDS), multi-seed and single-model."""

from logix.eval.lds import LDSResult, lds
from logix.eval.rank_statistics import bootstrap_ci, rankdata, spearman
from logix.eval.retrain import retrain_outputs, sample_subsets
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
