"""What `attach` checks of a Trainer before logging it, and how it keeps the id column in its batches."""

from __future__ import annotations

from typing import Any

from logix.errors import CaptureError
from logix.run import Run


def check_supported(trainer: Any, run: Run) -> None:
    """Raise a CaptureError naming the fix if the Trainer's setup is one logix cannot log."""
    if run.mode != "log":
        raise CaptureError("attach() logs training gradients: use a run with mode='log'")
    if getattr(trainer.args, "n_gpu", 1) > 1:
        raise CaptureError(
            "the Trainer uses torch.nn.DataParallel (n_gpu > 1), whose replicas logix "
            "cannot watch; run one process per GPU (torchrun / accelerate launch)"
        )
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise CaptureError(
            "DeepSpeed and FSDP shard the watched layers' weights; logix's Trainer "
            "integration does not support them"
        )
    if getattr(trainer.args, "label_smoothing_factor", 0.0):
        raise CaptureError(
            "label smoothing changes the per-example loss logix attributes; set "
            "label_smoothing_factor=0 to log with the Trainer"
        )


def keep_column(trainer: Any, column: str) -> bool:
    """Keep the id column through the Trainer's removal of columns the model does not accept
    (the list of accepted columns is the Trainer's own, extended by one name). True if added."""
    if not trainer.args.remove_unused_columns:
        return False
    setup = getattr(trainer, "_set_signature_columns_if_needed", None)
    if setup is None:
        raise CaptureError(
            f"this transformers version removes the {column!r} column in a way logix does not know; "
            "set remove_unused_columns=False in TrainingArguments"
        )
    setup()
    if column in trainer._signature_columns:
        return False
    trainer._signature_columns.append(column)
    return True
