"""Measurement functions: what a query's gradient is the gradient of.

The query side of influence accepts any scalar function of the model's output. Each helper here
returns one value per example, `[batch]`, computed from that example's output alone; you reduce
them over the batch and call backward inside the query block:

    with query(data_id=ids):
        values = measurements.completion_loss(model(input_ids), input_ids, completion_mask)
        measurements.reduce(values, query).backward()

Two rules.

1. Sign. The engine explains *decreases of what you backprop*: a positive score means that
   up-weighting the training example lowers the backpropagated quantity. So backprop a loss:
   `cross_entropy`, `squared_error`, and the `_loss` twins `margin_loss` (= -margin) and
   `completion_loss` (= -log-probability). A positive score then means the training example
   *raises* the margin / makes the completion *more likely*. `margin` and `completion_logprob`
   return the quantities themselves (higher = better) for reporting; backpropagating them instead
   flips every sign.
2. Batch reduction. Reduce the per-example values the way the store's `capture.loss_reduction`
   says, `mean` (the default) or `sum`; `reduce(values, run)` reads it from the run. The capture
   undoes that reduction, so each query row is the gradient of that example's value alone, the
   same whatever the batch size. Each example's value must depend on that example only (no
   in-batch contrastive terms, no train-mode batch norm), or its row mixes other examples.

A diffusion-style or regression measurement is a `squared_error` on a fixed draw. For a denoiser
`eps_model(x_t, t)` and query images `x0`, draw the noise and timestep once per query (seeded by
its id, so the measurement is the same function every time it is computed):

    gen = torch.Generator().manual_seed(1234)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, T, (len(x0),), generator=gen)
    a = alpha_bar[t][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with query(data_id=ids):
        measurements.reduce(measurements.squared_error(eps_model(x_t, t), noise), query).backward()

Averaging over several draws (several backward calls inside one block accumulate) lowers the
variance of the measurement.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-example cross-entropy (a loss): logits [B, C] with labels [B], or logits [B, T, C]
    with labels [B, T] summed over the positions whose label is not `ignore_index`. -> [B]."""
    if logits.ndim == 2:
        return F.cross_entropy(logits, labels, reduction="none", ignore_index=ignore_index)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} "
            "without the class dimension"
        )
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=ignore_index
    )
    return ce.reshape(labels.shape[0], -1).sum(dim=1)


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The classification margin (higher = more confidently right), as in TRAK: the correct
    class's logit minus the log-sum-exp of the other logits, log(p / (1 - p)). logits [B, C],
    labels [B] -> [B]. To attribute it, backprop `margin_loss` (its negative)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"margin takes logits [B, C] and labels [B], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[1] < 2:
        raise ValueError("margin needs at least two classes")
    correct = logits.gather(1, labels[:, None])[:, 0]
    is_label = labels[:, None] == torch.arange(logits.shape[1], device=logits.device)
    others = logits.masked_fill(is_label, float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-margin [B]: backprop it so that a positive score means "raises the margin"."""
    return -margin(logits, labels)


def completion_logprob(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """log p(completion | prompt) per sequence of a causal LM (higher = more likely): the sum of
    log p(input_ids[t] | tokens before t) over the positions t where completion_mask [B, T] is 1.
    logits [B, T, V] are the model's outputs on input_ids [B, T] (position t predicts t+1), so
    completion_mask[:, 0] must be 0. -> [B]. To attribute it, backprop `completion_loss`."""
    if logits.ndim != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits must be [B, T, V] over input_ids [B, T], got {tuple(logits.shape)} "
            f"and {tuple(input_ids.shape)}"
        )
    if completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask {tuple(completion_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
        )
    if bool(completion_mask[:, 0].any()):
        raise ValueError(
            "completion_mask[:, 0] must be 0: no position predicts the first token "
            "(mark the completion's own tokens, after the prompt)"
        )
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = logp.gather(2, input_ids[:, 1:, None])[..., 0]  # [B, T-1]
    return (target * completion_mask[:, 1:].to(target.dtype)).sum(dim=1)


def completion_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """-log p(completion | prompt) [B] (the completion's summed token cross-entropy): backprop
    it so that a positive score means "makes this completion more likely"."""
    return -completion_logprob(logits, input_ids, completion_mask)


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ (prediction - target)² over all but the batch dimension (a loss): [B, ...] -> [B].
    A regression loss, or a denoiser's loss on a fixed noise draw (see the module doc)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    return (prediction - target).pow(2).reshape(prediction.shape[0], -1).sum(dim=1)


def reduce(values: torch.Tensor, run: Any) -> torch.Tensor:
    """Per-example values [B] -> the scalar to backprop: their mean or sum, as the store's
    `capture.loss_reduction` says (so each query row is its own example's gradient)."""
    if values.ndim != 1:
        raise ValueError(f"reduce takes per-example values [B], got shape {tuple(values.shape)}")
    reduction = run.config.capture.loss_reduction
    return values.mean() if reduction == "mean" else values.sum()
