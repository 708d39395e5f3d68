"""The contexts a `Run` hands out: one logged batch (`Step`, from `with run(data_id=ids):`), the
PCA statistics pass (`ProjectionFit`) and the empirical K-FAC pass (`CurvatureFit`).

They hold what belongs to one block or pass and call back into their run to store it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from logix.capture.hooks import CaptureError, StepState
from logix.capture.tokens import TokenRecorder
from logix.store.gradients import DataId

if TYPE_CHECKING:
    from logix.run import Run


class Step:
    """The context of one logged batch: `with run(data_id=ids, mask=attention_mask): ...`."""

    def __init__(self, run: Run, ids: list[DataId], mask: torch.Tensor | None,
                 per_token: bool = False, token_ids: torch.Tensor | None = None):
        self.run = run
        self.ids = ids
        self.mask = mask
        self.per_token = per_token
        self.token_ids = token_ids
        self.state: StepState | None = None
        self.handles: list = []
        self.row_scale: torch.Tensor | float = 1.0
        self.discarded = False
        self.nonfinite = "raise"

    def __enter__(self) -> "Step":
        run = self.run
        if run._captures is None and not run._fitting:
            if run._collector is not None:
                raise CaptureError(
                    f"projection.kind {run.config.projection.kind!r} needs its statistics pass "
                    "first: run some training batches inside `with run.fit_projections():`, then log")
            raise CaptureError("call run.watch(model) before `with run(data_id=...)`")
        if run._active is not None:
            raise CaptureError("`with run(...)` blocks cannot be nested")
        cfg = run.config.capture
        fitting_curvature = run._factors.fit_segment is not None
        self.state = StepState(
            batch_size=len(self.ids),
            width=run.width,
            grad_scale=float(len(self.ids)) if cfg.loss_reduction == "mean" else 1.0,
            mask=self.mask,
            attribution_only=cfg.attribution_only,
            destination=(run._writer.reserve(len(self.ids))
                         if run._writer is not None and not fitting_curvature else None),
            factors=run._factors.step_sums(),
            rows_wanted=not fitting_curvature,
            tokens=TokenRecorder() if self.per_token else None,
        )
        if run._fitting:
            self.handles = run._collector.attach(self.state.grad_scale, self.mask, cfg.attribution_only)
        else:
            self.handles = [c.attach(self.state) for c in run._captures]
        if cfg.attribution_only:
            run._freeze_parameters()
        run._active = self
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        run = self.run
        for h in self.handles:
            h.remove()
        self.state.open = False
        run._active = None
        if run.config.capture.attribution_only:
            run._restore_parameters()
        try:
            if exc_type is None and run._factors.fit_segment is not None:
                if not self.discarded:
                    run._factors.commit_fit_step(self.ids, self.state, self.row_scale,
                                                 self.nonfinite)
            elif exc_type is None and self.per_token:
                run._submit_tokens(self)
            elif exc_type is None and not run._fitting and not self.discarded:
                run._submit(self.ids, self.state, self.row_scale, self.nonfinite)
        finally:
            if self.state.factors is not None:
                self.state.factors.reset()  # a failed or discarded step adds nothing
        return False

    def scale_rows(self, factor: float | torch.Tensor) -> None:
        """Multiply the block's rows by `factor` (a number, or one per example [B]) when they are
        stored: for a loss scale known only after backward, e.g. a GradScaler's (pass
        1 / scaler.get_scale()) or an integration's loss normalisation. Calls multiply."""
        if isinstance(factor, torch.Tensor) and factor.numel() != 1:
            if factor.shape != (len(self.ids),):
                raise ValueError(f"factor must be a number or [batch={len(self.ids)}], "
                                 f"got {tuple(factor.shape)}")
            factor = factor.detach().double()
        else:
            factor = float(factor)
        self.row_scale = self.row_scale * factor

    def discard(self) -> None:
        """Store nothing of this block (e.g. an fp16 step whose gradients overflowed)."""
        self.discarded = True

    def skip_if_nonfinite(self) -> None:
        """Store nothing, with a warning, if a row holds NaN/inf (instead of raising): for fp16
        loss scaling, whose optimizer skips an overflowed step too."""
        self.nonfinite = "skip"


class ProjectionFit:
    """`with run.fit_projections():` — see `Run.fit_projections`."""

    def __init__(self, run: Run):
        self.run = run

    def __enter__(self) -> "ProjectionFit":
        self.run._fitting = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.run._fitting = False
        if exc_type is None:
            self.run._finish_fit()
        return False


class CurvatureFit:
    """`with run.fit_curvature():` — see `Run.fit_curvature`."""

    def __init__(self, run: Run, segment: str):
        self.run = run
        self.segment = segment

    def __enter__(self) -> "CurvatureFit":
        self.run._factors.begin_fit(self.segment)  # replaces the segment's sums, see fit_curvature
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.run._factors.end_fit(ok=exc_type is None, world_size=self.run.world_size)
        return False
