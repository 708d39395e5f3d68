"""An attribution pass of a fixed Hugging Face model over a dataset (`log_dataset`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from logix.errors import CaptureError
from logix.integrations.hf_batches import (
    PER_EXAMPLE_LOSSES,
    batch_logits,
    example_losses,
    pop_ids,
    shifts_labels,
)
from logix.run import Run


def log_dataset(
    model: nn.Module,
    dataset: Any,
    run: Run,
    *,
    id_column: str = "idx",
    batch_size: int = 8,
    collate_fn: Any = None,
    per_example_loss: str = "sum",
    shift_labels: bool | None = None,
    mask_column: str | None = "attention_mask",
) -> int:
    """One attribution pass of a fixed model over `dataset`: each example's gradient goes to `run`
    (the store of a log-mode run, or memory for a query-mode run: `run.gradients()`).

    The model runs in eval mode (no dropout); each example's loss is its token cross-entropy
    ("sum" or "mean" over its label tokens, as in `attach`), computed here from the logits.
    Batches are dicts with `id_column`, "labels" and the model's inputs. Parameters' `.grad` are
    left as they were (set capture.attribution_only to also skip the weight-gradient work).
    Returns the number of examples logged.
    """
    if per_example_loss not in PER_EXAMPLE_LOSSES:
        raise ValueError(f"per_example_loss must be one of {PER_EXAMPLE_LOSSES}, got {per_example_loss!r}")
    if run.model is None:
        run.watch(model)
    shift = shifts_labels(model) if shift_labels is None else shift_labels
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    reduction = run.config.capture.loss_reduction
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for p in params:  # backward must not add into the caller's pending gradients
        p.grad = None
    was_training = model.training
    model.eval()
    logged = 0
    try:
        for batch in loader:
            batch = dict(batch)
            ids = pop_ids(batch, id_column, "dataset")
            labels = batch.pop("labels", None)
            if labels is None:
                raise CaptureError(
                    "the dataset's batches have no 'labels': logix needs them for each example's loss"
                )
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            mask = batch.get(mask_column) if mask_column else None
            with run(data_id=ids, mask=mask) as block:
                block.skip_loss_check()  # the loss below is built with the run's reduction
                sums, counts = example_losses(batch_logits(model(**batch)), labels, shift)
                per = sums if per_example_loss == "sum" else sums / counts.clamp(min=1)
                (per.mean() if reduction == "mean" else per.sum()).backward()
            logged += len(ids)
    finally:
        model.train(was_training)
        for p, g in zip(params, grads):
            p.grad = g
    return logged
