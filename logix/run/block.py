"""`Block`: the context of one batch, the same for every pass of a run.

    with run(data_id=ids, mask=attention_mask) as block:   # logging, query capture, or inside a
        loss.backward()                                      # pass that backpropagates a loss
    with fit(data_id=ids, mask=...):                         # any pass (`run.fit_curvature()`, ...)
        fit.backward(model(x))                               # for passes that need the logits

On entry the block asks its pass for the sinks it needs and attaches the capture hooks (one
forward hook per watched module); on exit it removes them and hands the block to its pass to
commit (a clean exit) and to reset (always), so a failed block adds nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from logix.capture.functional_uses import check_functional_uses
from logix.capture.hooks import CaptureBlock, Sink, attach_hooks, check_mask_used
from logix.capture.loss_probe import LossProbe, report_loss_check
from logix.errors import CaptureError
from logix.store.ids import DataId


class Pass:
    """What a pass of a run (logging, query capture, a statistics pass) gives its blocks: the
    sinks of a block, the loss scale the hooks undo, what a finished block commits. The
    concrete passes are in `passes.py`; the user's side of the protocol is `Block`."""

    needs_logits = False  # True: a block ends with `pass.backward(logits)`, not loss.backward()
    checks_batch = True  # the hooks check each module's batch size against the block's ids
    checks_loss = True  # the first block checks the loss reduction (rows and statistics scale with it)

    def __init__(self, run: Any):
        self.run = run
        self.block: Block | None = None  # the block now open
        self.loss_checked = False  # the loss reduction was checked on a first block

    def check_block(self, block: Block) -> None:
        """Refuse a block this pass cannot take (called on entry, before any hook)."""

    def sinks(self, block: Block) -> dict[str, Sink]:
        raise NotImplementedError

    def grad_scale(self, block: Block) -> float:
        """B for a mean-reduced loss (its 1/B undone per example), else 1."""
        return float(len(block.ids)) if self.run.config.capture.loss_reduction == "mean" else 1.0

    def attribution_only(self) -> bool:
        return self.run.config.capture.attribution_only

    def loss_probe(self, block: Block) -> LossProbe | None:
        """Until one block has been checked: the probe that checks the loop's loss reduction
        (passes that backpropagate the user's loss, unless capture.check_loss is false)."""
        if (
            self.loss_checked
            or self.needs_logits
            or not self.checks_loss
            or not self.run.config.capture.check_loss
        ):
            return None
        return LossProbe([(c.name, c.module) for c in self.run.captures()], len(block.ids))

    def check_loss(self, block: Block) -> None:
        """After a clean block with a probe: warn when its loss does not reduce as configured."""
        if block.loss_probe is None or block.discarded or block.loss_probe.nonfinite():
            return  # try again on the next block
        self.loss_checked = True
        if block.loss_check_skipped:
            return
        reduction = self.run.config.capture.loss_reduction
        report_loss_check(block.loss_probe, reduction, block.capture.grad_scale, block.row_scale)

    def enter_block(self, block: Block) -> None:
        self.block = block
        self.run.enter_block(block)

    def exit_block(self, block: Block) -> None:
        self.block = None
        self.run.exit_block(block)

    def commit(self, block: Block) -> None:
        """Keep what a cleanly finished block captured."""

    def reset(self, block: Block) -> None:
        """After every block, failed or not: drop its partial sums."""

    def backward(self, logits: torch.Tensor, label_mask: torch.Tensor | None = None) -> None:
        raise CaptureError(
            "this pass backpropagates your loss: call loss.backward() inside the "
            "block; fit.backward(logits) is for fisher='true' passes"
        )


def hold_grads(model: torch.nn.Module | None) -> list[tuple[torch.nn.Parameter, Any]]:
    """Set aside every parameter's `.grad` (None or its tensor) and clear it, so that a query
    block's backward fills fresh gradients instead of adding to the training step's."""
    held = [] if model is None else [(p, p.grad) for p in model.parameters()]
    for p, _ in held:
        p.grad = None
    return held


def restore_grads(held: list[tuple[torch.nn.Parameter, Any]]) -> None:
    """Put back the `.grad` of each parameter as `hold_grads` found it (the same tensor, or
    None): querying mid-training leaves the next optimizer step as it would have been."""
    for p, grad in held:
        p.grad = grad


class Block:
    """One batch of a pass: its data ids, padding mask [B, T] and what the hooks captured."""

    def __init__(
        self,
        owner: Pass,
        ids: list[DataId],
        mask: torch.Tensor | None,
        *,
        per_token: bool = False,
        token_ids: torch.Tensor | None = None,
        via_run: bool = False,
    ):
        self.owner = owner
        self.ids = ids
        self.mask = mask
        self.per_token = per_token
        self.token_ids = token_ids
        self.via_run = via_run  # opened as `run(...)` rather than `fit(...)`
        self.capture: CaptureBlock | None = None
        self.loss_probe: LossProbe | None = None
        self.loss_check_skipped = False
        self.sinks: dict = {}  # the pass's sinks by role: "rows", "factors", "tokens", ...
        self.handles: list = []
        self.row_scale: torch.Tensor | float = 1.0
        self.discarded = False
        self.nonfinite = "raise"
        self.backwards = 0  # `backward(logits)` calls (passes that need logits)
        self.held_grads: list = []  # a query-mode block's parameters' `.grad`, set aside

    @property
    def batch_size(self) -> int:
        return len(self.ids)

    @property
    def grad_scale(self) -> float:
        """The factor the hooks undo on every example: B for a mean-reduced loss, else 1."""
        return self.capture.grad_scale

    def __enter__(self) -> Block:
        owner, run = self.owner, self.owner.run
        if run.active_block is not None:
            raise CaptureError("`with run(...)` / `with fit(...)` blocks cannot be nested")
        owner.check_block(self)
        self.sinks = owner.sinks(self)
        self.capture = CaptureBlock(
            batch_size=len(self.ids) if owner.checks_batch else None,
            sinks=list(self.sinks.values()),
            grad_scale=owner.grad_scale(self),
            mask=self.mask,
            attribution_only=owner.attribution_only(),
            outputs=[] if owner.needs_logits else None,
        )
        self.handles = attach_hooks([*run.captures(), run.functional_uses()], self.capture)
        self.loss_probe = owner.loss_probe(self)
        if self.loss_probe is not None:
            self.handles += self.loss_probe.attach()
        owner.enter_block(self)
        if run.mode == "query":  # last: nothing after it can fail and skip the restore
            self.held_grads = hold_grads(run.model)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.capture.open = False
        writer = getattr(self.owner.run, "writer", None)
        if exc_type is not None and writer is not None:
            writer.mark_failed()  # a later run of this process may take its rank over
        try:
            self.owner.exit_block(self)
            if exc_type is None:
                check_mask_used(self.capture)
                check_functional_uses(self.capture)
                self.owner.run.check_first_block(self)
                self.owner.check_loss(self)
                self.owner.commit(self)
        finally:
            self.owner.reset(self)
            restore_grads(self.held_grads)
            self.held_grads = []
        return False

    @property
    def reached(self) -> set[int]:
        """Indices of the watched modules that backward reached in this block."""
        return self.capture.reached

    def backward(self, logits: torch.Tensor, label_mask: torch.Tensor | None = None) -> None:
        """For passes that need the logits: the same as `fit.backward(logits, label_mask)`."""
        self.owner.backward(logits, label_mask)

    def scale_rows(self, factor: float | torch.Tensor) -> None:
        """Multiply the block's rows by `factor` (a number, or one per example [B]) when they are
        stored: for a loss scale known only after backward, e.g. a GradScaler's (pass
        1 / scaler.get_scale()) or an integration's loss normalisation. Calls multiply."""
        if isinstance(factor, torch.Tensor) and factor.numel() != 1:
            if factor.shape != (len(self.ids),):
                raise ValueError(
                    f"factor must be a number or [batch={len(self.ids)}], got {tuple(factor.shape)}"
                )
            factor = factor.detach().double()
        else:
            factor = float(factor)
        self.row_scale = self.row_scale * factor

    def skip_loss_check(self) -> None:
        """The caller reads each example's loss scale itself (the Hugging Face integration):
        no automatic loss-reduction check (`capture.check_loss`) for this pass."""
        self.loss_check_skipped = True

    def discard(self) -> None:
        """Store nothing of this block (e.g. an fp16 step whose gradients overflowed)."""
        self.discarded = True

    def skip_if_nonfinite(self) -> None:
        """Store nothing, with a warning, if a row holds NaN/inf (instead of raising): for fp16
        loss scaling, whose optimizer skips an overflowed step too."""
        self.nonfinite = "skip"
