"""`LogPass`: the run's own pass, behind every `with run(data_id=ids):` outside a statistics pass.

In log mode a block's rows [B, D] go to the store's writer (straight into its shard buffer when
the gradients are on the CPU), with the step's K-FAC factor sums when the config collects them;
in query mode rows stay in memory for `run.gradients()`, or per-position factors for
`run.token_gradients()` in a `per_token=True` block.
"""

from __future__ import annotations

import torch

from logix.capture.factors import FactorSink
from logix.capture.hooks import Sink, check_gradient_reached
from logix.capture.rows import RowSink
from logix.capture.tokens import TokenSink
from logix.errors import CaptureError
from logix.notices import warn
from logix.run.block import Block, Pass
from logix.store.writer import nonfinite_rows


class LogPass(Pass):
    """Rows (and factor sums) of logged or query blocks; see the module doc."""

    def check_block(self, block: Block) -> None:
        run = self.run
        if not run.is_capturing():
            if run.covariances is not None:
                raise CaptureError(
                    f"projection.kind {run.config.projection.kind!r} needs its statistics pass "
                    "first: run some training "
                    "batches inside `with run.fit_projections():`, then log"
                )
            raise CaptureError("call run.watch(model) before `with run(data_id=...)`")

    def sinks(self, block: Block) -> dict[str, Sink]:
        run = self.run
        if block.per_token:
            return {"tokens": TokenSink()}
        writer = run.writer
        destination = writer.reserve(len(block.ids)) if writer is not None else None
        sinks: dict[str, Sink] = {"rows": RowSink(len(block.ids), run.width, destination)}
        factors = run.factor_log.step_sums()
        if factors is not None:
            sinks["factors"] = FactorSink(factors)
        return sinks

    def commit(self, block: Block) -> None:
        if block.per_token:
            self._keep_tokens(block)
        elif not block.discarded:
            self._submit(block)

    def reset(self, block: Block) -> None:
        if "factors" in block.sinks:
            block.sinks["factors"].sums.reset()  # a failed or discarded step adds nothing

    def _submit(self, block: Block) -> None:
        run, ids, row_scale = self.run, block.ids, block.row_scale
        check_gradient_reached(block.reached)
        rows = block.sinks["rows"].finish(run.modules)
        if isinstance(row_scale, torch.Tensor):
            rows.mul_(row_scale.to(device=rows.device, dtype=rows.dtype).unsqueeze(1))
        elif row_scale != 1.0:
            rows.mul_(row_scale)
        nonfinite = nonfinite_rows(rows)  # once: the writer is told, not asked to look again
        if block.nonfinite == "skip" and nonfinite:
            warn(
                f"skipped a batch of {len(ids)} examples whose gradients are not finite "
                f"(first ids {ids[:5]}): nothing of it was stored",
            )
            return
        if run.mode == "query":
            bad = [ids[i] for i in nonfinite]
            if bad:
                raise CaptureError(
                    f"non-finite gradients (NaN/inf) for data ids {bad[:10]}"
                    f"{' …' if len(bad) > 10 else ''}: is the loss NaN? Nothing of this batch was stored"
                )
            run.keep_query_rows(ids, rows)
            return
        factors = "factors" in block.sinks
        if factors:
            run.factor_log.check_scale(row_scale)  # before the rows are stored
        again = run.take_rerun_ids(ids)
        if again:  # a resumed trajectory's training: these rows are stored already
            keep = [k for k, i in enumerate(ids) if i not in again]
            ids, rows = [ids[k] for k in keep], rows[keep]
            nonfinite = nonfinite_rows(rows)
            if not ids:
                return
            factors = False  # the block's factor sums cannot be split; the file says what it covers
        # ids were normalised by `batch_ids`, rows are [B, D] by construction: the writer checks
        # duplicates and refuses the non-finite rows found above; it takes ownership of rows.
        run.writer.add_checked(ids, rows, nonfinite)
        if factors:
            run.factor_log.commit(run.writer.segment, ids, block.reached, row_scale)
        run.count_logged_batch()

    def _keep_tokens(self, block: Block) -> None:
        run = self.run
        part = block.sinks["tokens"].finish(
            block.ids, list(run.modules), run.fingerprint or "", block.mask, block.token_ids
        )
        bad = [part.data_ids[i] for i in nonfinite_rows(part.gradients().values)]
        if bad:
            raise CaptureError(
                f"non-finite gradients (NaN/inf) for data ids {bad[:10]}: is the "
                "loss NaN? Nothing of this batch was kept"
            )
        run.keep_token_part(part)
