"""The linear datamodeling score (LDS): how well attribution scores predict retraining.

For M random subsets S_j of the training set (each a fraction `alpha` of it), retrain the model
on S_j and measure an output on every test example q (its loss, its margin, ...). The scores
predict that output additively: `pred[j, q] = Σ_{z ∈ S_j} score[q, z]`. The LDS of q is the
Spearman rank correlation, over the M subsets, between `pred[:, q]` and the measured output;
the LDS of a method is the mean over test examples.

Sign convention. logix scores are positive when a training example *helps* the query (lowers
its loss). With `output="loss"` (the default) the measured output is a loss, so a larger
predicted help must mean a *lower* output: the correlation is taken with `-output`. With
`output="score"` the measured output already grows when training helps (a margin, a
log-probability, an accuracy) and is used as it is. A perfect method has LDS 1 either way.

The three pieces are independent:

    subsets = sample_subsets(n_train, n_subsets=100, alpha=0.5, seed=0)   # [M, n_train] bool
    outputs = retrain_outputs(train_fn, subsets, out_dir="out/lds")       # [M, n_test]
    result = lds(scores, subsets, outputs, output="loss")                 # LDSResult

The first two live in `logix.eval.retrain`, the rank statistics in `logix.eval.rank_statistics`;
all are importable from here and from `logix.eval`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from logix.eval.rank_statistics import bootstrap_ci, rankdata, spearman  # noqa: F401  (rankdata: public here)
from logix.eval.retrain import TrainFn, retrain_outputs, sample_subsets  # noqa: F401  (public here)

OUTPUT_KINDS = ("loss", "score")


@dataclass
class LDSResult:
    """The LDS of one set of scores.

    mean: mean Spearman correlation over the valid test examples; ci_low / ci_high: the
    `level` confidence interval of that mean over test examples (percentile bootstrap);
    per_test: [n_test] float64, NaN where undefined (constant predictions or outputs);
    n_valid: test examples with a defined correlation; n_subsets: M.

    The interval reflects the choice of test examples only, not the retraining noise in the
    measured outputs (average several seeds per subset to shrink that).
    """

    mean: float
    ci_low: float
    ci_high: float
    per_test: torch.Tensor
    n_valid: int
    n_subsets: int
    output: str
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def lds(
    scores: torch.Tensor | np.ndarray,
    subsets: torch.Tensor | np.ndarray,
    outputs: torch.Tensor | np.ndarray,
    *,
    output: str = "loss",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> LDSResult:
    """The linear datamodeling score of `scores` against retraining results.

    scores [n_test, n_train] (positive = helps the test example, logix's convention);
    subsets [M, n_train] bool (from `sample_subsets`); outputs [M, n_test] (from
    `retrain_outputs`). output: "loss" if the outputs fall when training helps (they are
    negated before correlating), "score" if they rise. Returns an `LDSResult` whose per-test
    values are the Spearman correlations over the M subsets between `subsets @ scores.T` and
    the (signed) outputs.
    """
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    scores = torch.as_tensor(scores).to(torch.float64)
    subsets = torch.as_tensor(subsets).to(torch.bool)
    outputs = torch.as_tensor(outputs).to(torch.float64)
    if scores.ndim != 2 or subsets.ndim != 2 or outputs.ndim != 2:
        raise ValueError(
            "scores [n_test, n_train], subsets [M, n_train] and outputs [M, n_test] must all be 2-D"
        )
    n_test, n_train = scores.shape
    if subsets.shape[1] != n_train:
        raise ValueError(f"subsets cover {subsets.shape[1]} training examples, scores {n_train}")
    if outputs.shape != (subsets.shape[0], n_test):
        raise ValueError(
            f"outputs must be [M={subsets.shape[0]}, n_test={n_test}], got {tuple(outputs.shape)}"
        )
    if subsets.shape[0] < 3:
        raise ValueError("a rank correlation needs at least 3 subsets")
    predicted = subsets.to(torch.float64) @ scores.T  # [M, n_test]
    target = -outputs if output == "loss" else outputs
    per_test = spearman(predicted, target)
    valid = per_test[~torch.isnan(per_test)]
    mean = float(valid.mean()) if valid.numel() else float("nan")
    low, high = bootstrap_ci(per_test, level=level, n_boot=n_boot, seed=seed)
    return LDSResult(mean, low, high, per_test, int(valid.numel()), int(subsets.shape[0]), output, level)
