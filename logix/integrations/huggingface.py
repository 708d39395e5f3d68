"""Hugging Face `Trainer` integration: per-example gradients of real training, and an attribution pass.

    run = logix.init("runs/gpt2", config={"capture": {"include": ["*mlp.c_fc"]}})
    attach(trainer, run)          # the dataset has an "idx" column: one id per example
    trainer.train()
    run.finalize()

Why `attach` patches the Trainer rather than being only a `TrainerCallback`: a callback is called
before and after a whole optimizer step, never around one micro-batch's forward and backward,
which is what a `with run(data_id=ids):` block must enclose. `attach` therefore wraps three methods
of *this* Trainer instance (any Trainer subclass, optimizer and scheduler untouched):
`training_step` (one logged block per micro-batch, so gradient accumulation logs every micro-batch
with its own rows), `compute_loss` (to read the logits the loss came from) and `prediction_step`
(which drops the id column before evaluation). A small callback starts a segment per epoch and
flushes the store when training ends. `detach()` undoes all of it.

Per-example loss. A row is the gradient of example n's own loss L_n, where L_n is
  "sum":  the cross-entropy summed over n's label tokens (labels != -100; for causal LMs the
          labels shifted by one, as the model's loss does); the default, and the weight the
          example really has in the update up to one factor shared by the batch;
  "mean": that sum divided by n's number of label tokens.
The Trainer backpropagates c · Σ_n L_n^sum, with c = 1/(tokens in the accumulated batch), over
the accumulation steps, times a GradScaler's scale under fp16; `attach` recomputes Σ_n L_n^sum from
the logits, checks that the loss has this form (label smoothing or a custom loss raise an error
naming the fix) and divides c out of each row (`hf_row_scale.scale_rows`). Rows are therefore
independent of batch size, padding and gradient accumulation.
"""

from __future__ import annotations

from typing import Any

import torch

from logix.errors import CaptureError
from logix.integrations.hf_batches import (
    PER_EXAMPLE_LOSSES,
    batch_logits,
    example_losses,
    pop_ids,
    shifts_labels,
)
from logix.integrations.hf_dataset import log_dataset  # noqa: F401  (public here)
from logix.integrations.hf_row_scale import MicroBatch, scale_rows
from logix.integrations.hf_trainer_checks import check_supported, keep_column
from logix.run import Run
from logix.vocabulary import FACTOR_STATISTICS

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("logix.integrations.huggingface needs transformers: pip install 'logix[hf]'") from e


class LogixCallback(TrainerCallback):
    """Starts a segment per epoch (ids may repeat across epochs, not within a segment) and flushes
    the store when training ends."""

    def __init__(self, run: Run, segment_per_epoch: bool = True):
        self.run = run
        self.segment_per_epoch = segment_per_epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.segment_per_epoch:
            epoch = round(state.epoch or 0)
            meta: dict[str, Any] = {"epoch": epoch, "first_step": state.global_step}
            scheduler = kwargs.get("lr_scheduler")
            if scheduler is not None and hasattr(scheduler, "get_last_lr"):
                meta["lr"] = float(scheduler.get_last_lr()[0])  # at the epoch's first step
            self.run.start_segment(f"epoch-{epoch}", **meta)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.segment_per_epoch:
            # Optimizer steps of the epoch: the horizon K of `stagewise_scores` (the segment's
            # logged_batches count micro-batches, k times too many with gradient accumulation).
            first = int(self.run.segment_meta().get("first_step", 0))
            self.run.set_segment_meta(steps=state.global_step - first)

    def on_train_end(self, args, state, control, **kwargs):
        self.run.flush()


class TrainerLogging:
    """The hooks `attach` put on one Trainer; `detach()` removes them."""

    def __init__(
        self,
        trainer: Any,
        run: Run,
        id_column: str,
        per_example_loss: str,
        segment_per_epoch: bool,
        mask_column: str | None,
    ):
        if per_example_loss not in PER_EXAMPLE_LOSSES:
            raise ValueError(
                f"per_example_loss must be one of {PER_EXAMPLE_LOSSES}, got {per_example_loss!r}"
            )
        if "_logix" in trainer.__dict__:
            raise CaptureError("this Trainer already logs to a logix run; detach() that one first")
        check_supported(trainer, run)
        if run.config.capture.attribution_only:
            raise CaptureError(
                "capture.attribution_only freezes the parameters inside each logged "
                "block, which would stop the Trainer's training; it is for "
                "log_dataset() passes over a trained model. Log during training "
                "with attribution_only: false"
            )
        if per_example_loss == "mean" and set(FACTOR_STATISTICS) & set(run.config.curvature.statistics):
            raise CaptureError(
                "per_example_loss='mean' weights each example's rows by 1/tokens, "
                "which K-FAC sums over the batch cannot take: log without "
                "kfac/ekfac in curvature.statistics (compute the factors later "
                "with run.fit_curvature()), or use per_example_loss='sum'"
            )
        self.trainer, self.run = trainer, run
        self.id_column, self.per_example_loss = id_column, per_example_loss
        self.mask_column = mask_column
        if run.model is None:
            run.watch(trainer.model)
        elif run.model is not trainer.model:
            raise CaptureError("the run already watches another model than trainer.model; use a new run")
        self.shift = shifts_labels(trainer.model)
        self._added_column = keep_column(trainer, id_column)
        self._batch: MicroBatch | None = None
        self._saved = {
            name: trainer.__dict__.get(name) for name in ("training_step", "compute_loss", "prediction_step")
        }
        self._originals = {name: getattr(trainer, name) for name in self._saved}
        trainer.training_step = self._training_step
        trainer.compute_loss = self._compute_loss
        trainer.prediction_step = self._prediction_step
        self.callback = LogixCallback(run, segment_per_epoch)
        trainer.add_callback(self.callback)
        trainer._logix = self

    def detach(self) -> None:
        """Restore the Trainer's own methods and remove the callback."""
        for name, value in self._saved.items():
            if value is None:
                self.trainer.__dict__.pop(name, None)
            else:
                setattr(self.trainer, name, value)
        self.trainer.remove_callback(self.callback)
        if self._added_column:
            self.trainer._signature_columns.remove(self.id_column)
        del self.trainer._logix

    # -- the wrapped methods ----------------------------------------------------------------
    def _training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        ids = pop_ids(inputs, self.id_column, "training")
        labels = inputs.get("labels")
        if labels is None:
            raise CaptureError(
                "the training batch has no 'labels': logix reads each example's loss from them"
            )
        num_items = None if num_items_in_batch is None else float(num_items_in_batch)
        mask = inputs.get(self.mask_column) if self.mask_column else None
        with self.run(data_id=ids, mask=mask) as step:
            step.skip_loss_check()  # scale_rows reads the loss scale from the logits itself
            self._batch = MicroBatch(step, labels, num_items)
            try:
                loss = self._originals["training_step"](model, inputs, num_items_in_batch, *args, **kwargs)
                scale_rows(self._batch, loss, self.trainer.accelerator, self.per_example_loss)
            finally:
                self._batch = None
        return loss

    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        batch = self._batch
        if batch is None or batch.loss is not None:  # evaluation, or a second call: not ours
            return self._originals["compute_loss"](
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
            )
        loss, outputs = self._originals["compute_loss"](
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch, **kwargs
        )
        with torch.no_grad():
            batch.sums, batch.counts = example_losses(
                batch_logits(outputs).detach(), batch.labels, self.shift
            )
        batch.loss = loss.detach()
        return (loss, outputs) if return_outputs else loss

    def _prediction_step(self, model, inputs, *args, **kwargs):
        inputs.pop(self.id_column, None)
        return self._originals["prediction_step"](model, inputs, *args, **kwargs)


def attach(
    trainer: Any,
    run: Run,
    *,
    id_column: str = "idx",
    per_example_loss: str = "sum",
    segment_per_epoch: bool = True,
    mask_column: str | None = "attention_mask",
) -> TrainerLogging:
    """Log the per-example gradient of every training example `trainer.train()` sees into `run`.

    trainer: a transformers `Trainer` (or subclass), optimizer and all, used as it is.
    run: a log-mode run; watches `trainer.model` unless it already does.
    id_column: the dataset column holding each example's data id (kept away from the model).
    per_example_loss: "sum" or "mean" of the example's token cross-entropies (module docstring).
    segment_per_epoch: one store segment per epoch ("epoch-0", ...), with the epoch's first lr.
    mask_column: the batch's [B, T] padding mask (None: no mask; see `run(mask=...)`).
    Returns a handle whose `detach()` restores the Trainer.
    """
    return TrainerLogging(trainer, run, id_column, per_example_loss, segment_per_epoch, mask_column)
