"""What the Hugging Face integration reads from a batch: each example's id and its loss.

A row is the gradient of example n's own loss: its token cross-entropy summed ("sum") or
averaged ("mean") over its label tokens (labels != -100; shifted by one for causal LMs, as the
model's own loss does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from logix.capture.per_sample import full_precision
from logix.errors import CaptureError

PER_EXAMPLE_LOSSES = ("sum", "mean")
IGNORE_INDEX = -100


def shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss predicts labels[t + 1] from position t (a causal LM)."""
    loss_function = getattr(model, "loss_function", None)
    return getattr(loss_function, "__name__", "") == "ForCausalLMLoss"


def example_losses(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's cross-entropy summed over its label tokens, and the number of those tokens.

    logits [B, T, V] with labels [B, T] (token-level; `shift` for causal LMs), or logits [B, C]
    with labels [B]. Returns sums [B] float32 (differentiable) and counts [B] int64. Cross-entropy
    is taken in float32 with autocast off, as transformers' losses do.
    """
    labels = labels.to(logits.device)
    with full_precision(logits.device):
        if labels.ndim == 1:
            per = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
            return per, (labels != IGNORE_INDEX).long()
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        batch, seq = labels.shape
        per = F.cross_entropy(
            logits.reshape(batch * seq, -1).float(),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        return per.view(batch, seq).sum(1), (labels != IGNORE_INDEX).sum(1)


def batch_logits(outputs: Any) -> torch.Tensor:
    logits = outputs.get("logits") if hasattr(outputs, "get") else None
    if logits is None:
        raise CaptureError(
            "the model's output has no 'logits'; logix's Hugging Face integration needs a model "
            "returning a ModelOutput with logits (return_dict=True)"
        )
    return logits


def pop_ids(batch: dict, column: str, where: str) -> list:
    if column not in batch:
        raise CaptureError(
            f"the {where} batch has no {column!r} column: give every example an id, e.g. "
            f"dataset.map(lambda e, i: {{{column!r}: i}}, with_indices=True), or pass id_column=. "
            "If the column exists, your Trainer drops it: set remove_unused_columns=False"
        )
    ids = batch.pop(column)
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
