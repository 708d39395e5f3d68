"""The statistics passes a run hands out: `run.fit_projections(...)` and `run.fit_curvature(...)`.

Every one is used the same way, and each block is the same `Block`:

    with run.fit_curvature(...) as fit:          # or run.fit_projections(...)
        for ids, x, y in batches:
            with fit(data_id=ids, mask=mask):     # `with run(data_id=ids):` also works for the
                loss(model(x), y).backward()      # passes that backpropagate the user's loss
                # fit.backward(model(x))          # fisher="true": the pass backpropagates itself

- `ProjectionPass` (projection.kind pca): each module's activation and output-gradient
  covariances (`capture.pca.CovarianceSink`); on exit P_in, P_out are their top eigenvectors
  and the store is created. fisher="true": g are the true Fisher's pseudo-gradients
  (`capture.fisher`), so P_out spans the Gauss–Newton output factor's top directions.
- `CurvaturePass` (empirical): the K-FAC factors of a store logged without them.
- `TrueFisherPass`: the true-Fisher statistics of `curvature.fit.TrueFisherStatistics`.

Nothing is written to the store's rows; the model and its parameters are not changed (the
fisher="true" passes use `torch.autograd.grad` to the watched outputs only).
"""

from __future__ import annotations

from typing import Any

import torch

from logix.capture.factors import FactorSink
from logix.capture.fisher import (
    FisherLogitGrads,
    backpropagate_to,
    check_pass_logits,
    fisher_logit_grads,
)
from logix.capture.hooks import Sink, check_batch_mask
from logix.capture.rows import RowSink
from logix.curvature.fit import TrueFisherStatistics
from logix.errors import CaptureError
from logix.progress import ProgressBars, closing
from logix.run.block import Block, Pass
from logix.store.writer import batch_ids


class StatisticsPass(Pass):
    """A pass over some batches, used as `with pass_ as fit:` / `with fit(data_id=ids):`."""

    spelling = "run.fit_...()"  # how the user opens it, for error messages

    def __init__(self, run: Any):
        super().__init__(run)
        self.open = False
        self.progress: ProgressBars | None = None  # with a known number of batches
        self.total = self.blocks = 0

    def show_progress(self, total: int | None, quiet: bool = False) -> StatisticsPass:
        """Draw a progress bar over `total` batches (blocks) on stderr, when it is a terminal."""
        if total is not None:
            self.progress, self.total = ProgressBars(quiet=quiet), int(total)
        return self

    def __enter__(self) -> StatisticsPass:
        self.run.begin_pass(self)
        self.open = True
        self.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.open = False
        with closing(self.progress):
            self.run.end_pass(self)
            self.end(ok=exc_type is None)
        return False

    def exit_block(self, block: Block) -> None:
        super().exit_block(block)
        self.blocks += 1
        if self.progress is not None:
            self.progress("pass", min(self.blocks, self.total), self.total)

    def __call__(self, data_id: Any, mask: torch.Tensor | None = None) -> Block:
        """A context for one batch: one id per example; `mask` [B, T] marks real (1) and
        padded (0) input positions, exactly as in `with run(data_id=..., mask=...)`."""
        if not self.open:
            raise CaptureError(f"use the pass as `with {self.spelling} as fit:`")
        ids = batch_ids(data_id)
        check_batch_mask(mask, len(ids))
        return Block(self, ids, mask)

    def begin(self) -> None:
        """On entry."""

    def end(self, ok: bool) -> None:
        """On exit; `ok`: no exception."""

    def check_block(self, block: Block) -> None:
        if self.needs_logits and block.via_run:
            raise CaptureError(
                f"inside {self.spelling} use `with fit(data_id=ids): "
                "fit.backward(model(x))`, not `with run(...)` and loss.backward()"
            )

    def grad_scale(self, block: Block) -> float:
        # The pseudo-gradients of a Fisher pass are already those of each example's own loss.
        return 1.0 if self.needs_logits else super().grad_scale(block)

    def attribution_only(self) -> bool:
        return True if self.needs_logits else super().attribution_only()

    def commit(self, block: Block) -> None:
        if self.needs_logits and block.backwards == 0:
            raise CaptureError("call fit.backward(logits) inside `with fit(data_id=...)`")

    def fisher_grads(
        self, logits: torch.Tensor, label_mask: torch.Tensor | None, mass: float = 1.0
    ) -> FisherLogitGrads:
        """The open block's Fisher logit-gradients ℓ from `logits`, one per backward pass."""
        block = self.block
        if block is None:
            raise CaptureError("call fit.backward(logits) inside a `with fit(data_id=...)` block")
        check_pass_logits(logits, len(block.ids), block.capture.outputs)
        return fisher_logit_grads(logits, label_mask, mass)

    def backpropagate(self, logits: torch.Tensor, ell: torch.Tensor) -> None:
        """One pseudo-gradient pass: ℓ from `logits` to the watched outputs, through the hooks."""
        capture = self.block.capture
        capture.reached = set()
        backpropagate_to(capture.outputs, logits, ell)
        if not capture.reached:
            raise CaptureError("the backward pass reached no watched module")


class ProjectionPass(StatisticsPass):
    """`with run.fit_projections(fisher=...):` — see the module doc. `passes`: the backward
    passes so far (fisher="true": one per class slot and position per batch)."""

    checks_batch = False  # ids are only counted here; the logits' batch is checked instead
    checks_loss = False  # projections take directions only: a loss scale changes none of them

    def __init__(self, run: Any, fisher: str):
        super().__init__(run)
        self.fisher = fisher
        self.needs_logits = fisher == "true"
        self.spelling = "run.fit_projections(fisher='true')" if self.needs_logits else "run.fit_projections()"
        self.passes = 0

    def sinks(self, block: Block) -> dict[str, Sink]:
        return {"covariances": self.run.covariances}

    def end(self, ok: bool) -> None:
        if ok:
            self.run.finish_projections()

    def backward(self, logits: torch.Tensor, label_mask: torch.Tensor | None = None) -> None:
        """Backpropagate the batch's Fisher pseudo-gradients from `logits` ([B, C] or [B, T, V],
        computed inside the block) into the output-gradient covariances. label_mask: [B] or
        [B, T]; 1 at targets of the loss, 0 elsewhere (see `capture.fisher.fisher_logit_grads`)."""
        if not self.needs_logits:
            super().backward(logits, label_mask)
        for ell in self.fisher_grads(logits, label_mask):
            self.backpropagate(logits, ell)
            self.passes += 1
        self.block.backwards += 1


class CurvaturePass(StatisticsPass):
    """`with run.fit_curvature():` — the empirical K-FAC factors of `segment`; the pass's sums
    replace the segment's file on a clean exit."""

    spelling = "run.fit_curvature()"

    def __init__(self, run: Any, segment: str):
        super().__init__(run)
        self.segment = segment

    def begin(self) -> None:
        self.run.factor_log.begin_fit(self.segment)  # replaces the segment's sums

    def end(self, ok: bool) -> None:
        self.run.factor_log.end_fit(ok=ok, world_size=self.run.world_size)

    def sinks(self, block: Block) -> dict[str, Sink]:
        return {"factors": FactorSink(self.run.factor_log.step)}

    def commit(self, block: Block) -> None:
        if not block.discarded:
            self.run.factor_log.commit_fit_step(block.ids, block.reached, block.row_scale, block.nonfinite)

    def reset(self, block: Block) -> None:
        self.run.factor_log.step.reset()


class TrueFisherPass(StatisticsPass):
    """`with run.fit_curvature(fisher="true", ...) as fit:` — see `curvature/fit.py`. After the
    pass: `examples`, `pseudo_rows`, `passes`, `positions`, `dropped_mass`, `paths`."""

    needs_logits = True
    spelling = "run.fit_curvature(fisher='true')"

    def __init__(self, run: Any, stats: TrueFisherStatistics):
        super().__init__(run)
        self.stats = stats

    examples = property(lambda self: self.stats.examples)
    pseudo_rows = property(lambda self: self.stats.pseudo_rows)
    passes = property(lambda self: self.stats.passes)
    positions = property(lambda self: self.stats.positions)
    dropped_mass = property(lambda self: self.stats.dropped_mass)
    paths = property(lambda self: self.stats.paths)

    def statistics(self, kind: str = "raw"):
        """The summed statistics of `kind` so far (a `curvature.covariance.Statistics`)."""
        return self.stats.statistics(kind)

    def end(self, ok: bool) -> None:
        if ok:
            self.stats.save()

    def sinks(self, block: Block) -> dict[str, Sink]:
        sinks: dict[str, Sink] = {}
        if self.stats.rows_wanted:
            sinks["rows"] = RowSink(len(block.ids), self.run.width)
        if self.stats.pending is not None:  # A once per forward position, S per pass
            sinks["factors"] = FactorSink(self.stats.pending, inputs_once=True)
        return sinks

    def commit(self, block: Block) -> None:
        super().commit(block)
        self.stats.add_batch(block.ids)

    def reset(self, block: Block) -> None:
        if self.stats.pending is not None:
            self.stats.pending.reset()  # a failed block adds nothing to the factors

    def backward(self, logits: torch.Tensor, label_mask: torch.Tensor | None = None) -> None:
        """Backpropagate the batch's Fisher pseudo-gradients from `logits` ([B, C] or
        [B, T, V], computed inside the block) and add them to the statistics.

        label_mask: [B] or [B, T] like `logits` without its last dimension; 1 at targets of the
        loss, 0 elsewhere, other values weight a position (see `fisher_logit_grads`)."""
        grads = self.fisher_grads(logits, label_mask, self.stats.mass)
        block = self.block
        rows = block.sinks.get("rows")
        if rows is not None and (rows.destination is None or rows.destination.device != logits.device):
            rows.destination = torch.empty(len(block.ids), self.run.width, device=logits.device)
        passes = 0
        for ell in grads:
            active = ell.detach().flatten(1).abs().amax(dim=1) > 0
            if rows is not None:
                rows.reset()
            self.backpropagate(logits, ell)
            passes += 1
            if rows is not None:
                ids = [block.ids[i] for i in active.nonzero().flatten().tolist()]
                self.stats.add_rows(ids, rows.finish(self.run.modules)[active])
        self.stats.count(passes, grads.positions, float(grads.dropped_mass.sum()))
        block.backwards += 1
