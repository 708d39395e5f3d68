"""Language-model losses per example, and the check that a loop reduces them as the config says.

`capture.loss_reduction` is the reduction *over the batch* (mean or sum of per-example losses),
which logix undoes to get each example's own gradient. It is not the reduction over tokens: a
loop that backprops the mean over every token of the batch (`F.cross_entropy(logits.flatten(0,
1), ...)`) weights each example by its token count / the batch's, and its rows are then not the
per-example gradients of any fixed loss. Compute the per-example loss first (`next_token_loss`),
then reduce it with `batch_loss`, which reads the run's setting. For a loop that computes its own
loss, `check_loop_loss` (from the first batch's logits, no extra pass) finds which reduction it is
and names the fix for a wrong one or a token mean; `check_batch_reduction` does the same from
per-example losses the loop already has.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from logix.errors import ConfigError
from logix.vocabulary import LOSS_REDUCTIONS, check_choice

PER_EXAMPLE = ("sum", "mean")  # over an example's target tokens


def next_token_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None, per_example: str = "sum"
) -> torch.Tensor:
    """The causal-LM loss of each sequence, [B]: the cross-entropy of predicting input_ids[:, t+1]
    from logits[:, t] ([B, T, V] over input_ids [B, T]), at every t+1 where mask [B, T] is 1
    (the padding mask: padded tokens are no targets; position 0 never is one), summed or
    averaged (`per_example`) over the sequence's targets. A sequence without targets gives 0."""
    check_choice(per_example, PER_EXAMPLE, "per-example reduction")
    if logits.ndim != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits must be [B, T, V] over input_ids [B, T], got {tuple(logits.shape)} "
            f"and {tuple(input_ids.shape)}"
        )
    if mask is not None and mask.shape != input_ids.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    targets = torch.ones_like(ce) if mask is None else mask[:, 1:].to(ce.dtype)  # [B, T-1]
    total = (ce * targets).sum(1)
    if per_example == "sum":
        return total
    return total / targets.sum(1).clamp_min(1)


def batch_loss(per_example: torch.Tensor, run: Any) -> torch.Tensor:
    """The scalar to backprop from per-example losses [B]: their mean or sum, as the run's
    `capture.loss_reduction` says."""
    if per_example.ndim != 1:
        raise ValueError(f"batch_loss takes per-example losses [B], got shape {tuple(per_example.shape)}")
    reduction = check_choice(run.config.capture.loss_reduction, LOSS_REDUCTIONS, "loss reduction")
    return per_example.mean() if reduction == "mean" else per_example.sum()


def check_batch_reduction(
    loss: torch.Tensor, per_example: torch.Tensor, run: Any, rtol: float = 1e-4
) -> None:
    """A ConfigError naming the fix when the loop's scalar `loss` is not the configured reduction
    (`capture.loss_reduction`) of `per_example` [B] (the same batch's per-example losses), e.g.
    a mean over tokens, or a sum where the config says mean."""
    reduction = run.config.capture.loss_reduction
    value = float(loss.detach())
    candidates = {"mean": float(per_example.detach().mean()), "sum": float(per_example.detach().sum())}
    want = candidates[reduction]
    if abs(value - want) <= rtol * max(abs(want), 1e-12):
        return
    other = "sum" if reduction == "mean" else "mean"
    if abs(value - candidates[other]) <= rtol * max(abs(candidates[other]), 1e-12):
        raise ConfigError(
            f"the loop's loss is the {other} of the per-example losses but "
            f"capture.loss_reduction is {reduction!r}: set it to {other!r}"
        )
    raise ConfigError(
        f"the loop's loss {value:.6g} is neither the mean ({candidates['mean']:.6g}) "
        f"nor the sum ({candidates['sum']:.6g}) of the per-example losses (a mean "
        "over tokens?): backprop logix.losses.batch_loss(per_example, run) instead"
    )


def loop_reductions(
    loss: torch.Tensor,
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    rtol: float = 1e-4,
) -> list[tuple[str, str]]:
    """Every (per-example, batch) reduction of the next-token loss that the loop's scalar `loss`
    equals on this batch (logits [B, T, V] over input_ids [B, T], mask [B, T]): several when
    they coincide (one sequence, or targets of one token each), none for e.g. a token mean."""
    value = float(loss.detach())
    found = []
    for per in PER_EXAMPLE:
        values = next_token_loss(logits.detach(), input_ids, mask, per_example=per)
        for batch in LOSS_REDUCTIONS:
            want = float(values.mean() if batch == "mean" else values.sum())
            if abs(value - want) <= rtol * max(abs(want), 1e-12):
                found.append((per, batch))
    return found


def check_loop_loss(
    loss: torch.Tensor,
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None,
    run: Any,
    rtol: float = 1e-4,
) -> str:
    """Check a causal-LM loop's own scalar `loss` against `capture.loss_reduction` from the same
    batch's logits [B, T, V] (no extra forward or backward; once, on the first batch, is
    enough): returns the per-example reduction ("sum" or "mean" over an example's targets) whose
    gradient each row then is; a ConfigError naming the fix when the batch reduction differs
    from the config's, or when the loss is the mean over every token of the batch."""
    reduction = check_choice(run.config.capture.loss_reduction, LOSS_REDUCTIONS, "loss reduction")
    found = loop_reductions(loss, logits, input_ids, mask, rtol)
    for per, batch in found:
        if batch == reduction:
            return per
    if found:
        per, batch = found[0]
        raise ConfigError(
            f"the loop's loss is the {batch} over the batch of per-example {per}s but "
            f"capture.loss_reduction is {reduction!r}: set it to {batch!r}"
        )
    totals = next_token_loss(logits.detach(), input_ids, mask, per_example="sum")
    targets = torch.ones_like(input_ids[:, 1:]) if mask is None else mask[:, 1:]
    token_mean = float(totals.sum()) / max(float(targets.sum()), 1.0)
    if abs(float(loss.detach()) - token_mean) <= rtol * max(abs(token_mean), 1e-12):
        raise ConfigError(
            "the loop's loss is the mean over every target token of the batch: it weights each "
            "sequence by its share of the batch's tokens, so the rows are no sequence's own "
            "gradient; backprop logix.losses.batch_loss(next_token_loss(logits, input_ids, mask, "
            "per_example='sum' or 'mean'), run) instead"
        )
    raise ConfigError(
        f"the loop's loss {float(loss.detach()):.6g} is no mean or sum over the batch of per-example "
        "next-token losses (summed or averaged over targets): backprop "
        "logix.losses.batch_loss(next_token_loss(logits, input_ids, mask), run) instead"
    )
