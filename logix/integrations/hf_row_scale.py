"""The factor c of a Trainer's backward loss c · Σ_n L_n^sum, divided out of each micro-batch's rows.

The Trainer backpropagates c · Σ_n L_n^sum, with c = 1/(tokens in the accumulated batch), over the
accumulation steps, times a GradScaler's scale under fp16. `scale_rows` recovers c from the loss
`compute_loss` returned and the per-example sums recomputed from its logits, checks that the loss
has this form, and rescales the block's rows so that they do not depend on batch size, padding or
gradient accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from logix.errors import CaptureError
from logix.run import Block

RATIO_TOLERANCE = 1e-4  # |Σ L_n / loss - N| / N: float32 sums agree to ~1e-6


@dataclass
class MicroBatch:
    """What one training_step learns about its loss, for the row scale."""

    step: Block
    labels: torch.Tensor
    num_items: float | None
    loss: torch.Tensor | None = None  # what compute_loss returned
    sums: torch.Tensor | None = None  # [B] Σ_t CE per example
    counts: torch.Tensor | None = None  # [B] label tokens per example


def accelerator_scale(accelerator: Any) -> float:
    """The factor accelerate's backward applies to the loss: 1/its accumulation steps, times a
    GradScaler's current scale under fp16."""
    factor = 1.0 / max(1, int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        factor *= float(scaler.get_scale())
    return factor


def scale_rows(
    batch: MicroBatch, backward_loss: torch.Tensor, accelerator: Any, per_example_loss: str
) -> None:
    """Divide out the factor c of backward loss = c · Σ_n L_n^sum from the block's rows
    (and, for per_example_loss="mean", each example's [B] token count)."""
    step = batch.step
    step.skip_if_nonfinite()  # an fp16 overflow: the optimizer skips this step too
    if batch.loss is None:
        raise CaptureError(
            "the Trainer's training_step did not call compute_loss; logix's integration reads "
            "the logits there (a Trainer subclass that computes its loss elsewhere is not supported)"
        )
    loss = float(batch.loss)
    total = float(batch.sums.double().sum())
    if total == 0.0 or loss == 0.0 or not (math.isfinite(loss) and torch.isfinite(backward_loss)):
        return  # nothing to attribute (no label tokens: zero rows) or a non-finite step (skipped)
    ratio = total / loss  # the N of loss = Σ_n L_n / N
    candidates = [float(batch.counts.sum())]
    if batch.num_items is not None:
        world = max(1, int(getattr(accelerator, "num_processes", 1)))
        candidates += [batch.num_items, batch.num_items / world]
    n = min(candidates, key=lambda c: abs(ratio - c))
    if abs(ratio - n) > RATIO_TOLERANCE * n:
        raise CaptureError(
            f"the Trainer's loss ({loss:.6g}) is not the token cross-entropy summed over the "
            f"batch's label tokens and divided by their number (Σ = {total:.6g}, ratio {ratio:.6g}, "
            f"counts {candidates}): label smoothing, a compute_loss_func or a custom loss is not "
            "supported; train with the model's own loss (label_smoothing_factor=0)"
        )
    accumulation = loss / float(backward_loss)  # training_step's division by the accumulation steps
    if abs(accumulation - round(accumulation)) > 1e-3 or round(accumulation) < 1:
        raise CaptureError(
            f"training_step scaled the loss by 1/{accumulation:.6g}, not 1/k for an "
            "integer k; logix cannot tell the per-example loss scale"
        )
    c = accelerator_scale(accelerator) / (n * round(accumulation))
    if per_example_loss == "sum":
        factor: torch.Tensor | float = 1.0 / c
    else:
        factor = 1.0 / (c * batch.counts.double().clamp(min=1))
    # the hooks already multiplied by the run's loss_reduction scale (B for "mean")
    step.scale_rows(factor / step.grad_scale)
