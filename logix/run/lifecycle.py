"""The half of `Run` after set-up: where finished blocks' results go (the store's segments, or
memory in query mode), flushing, finalizing. A base class of `Run`, whose state it shares."""

from __future__ import annotations

from typing import Any

import torch

from logix.capture.tokens import TokenGradients
from logix.curvature.reduce import finish_statistics
from logix.errors import CaptureError
from logix.notices import warn
from logix.store.finalize import finish_logging, record_ranks
from logix.store.gradients import Gradients
from logix.store.ids import DataId


class RunLifecycle:
    """Segments, results and the end of a run (see `logix.run.run.Run`)."""

    # -- results of blocks (called by the run's passes) ----------------------------------
    def keep_query_rows(self, ids: list[DataId], rows: torch.Tensor) -> None:
        """A query block's rows [B, D], kept on the CPU for `gradients()`."""
        self._query_rows.append(rows.to("cpu"))
        self._query_ids.extend(ids)

    def keep_token_part(self, part: TokenGradients) -> None:
        self._token_parts.append(part)

    def count_logged_batch(self) -> None:
        segment = self._writer.segment
        self._pending_batches[segment] = self._pending_batches.get(segment, 0) + 1

    def _record_batches(self) -> None:
        """Add the batches logged into the current segment to its meta `logged_batches` (the
        step count of a segment logged by the training steps themselves; kept across resumes)."""
        segment = self._writer.segment if self._writer is not None else None
        pending = self._pending_batches.pop(segment, 0)
        if pending:
            before = int(self._writer.segment_meta(segment).get("logged_batches", 0))
            self._writer.update_segment_meta({"logged_batches": before + pending})

    def token_gradients(self) -> TokenGradients:
        """The per-position factors captured in `per_token=True` blocks of a query-mode run, for
        `InfluenceEngine.token_scores`: one entry per sequence, positions padded to the longest."""
        if not self._token_parts:
            raise CaptureError(
                "no per-token gradients: capture them inside "
                "`with query(data_id=ids, mask=mask, per_token=True): loss.backward()`"
            )
        return TokenGradients.concatenate(self._token_parts)

    def gradients(self) -> Gradients:
        """The gradients captured by a query-mode run: values [n, D] float32 and data ids."""
        if self.mode != "query":
            raise CaptureError("gradients() is for mode='query' runs; a logging run writes to its store")
        values = torch.cat(self._query_rows) if self._query_rows else torch.zeros(0, self.width)
        return Gradients(values, list(self._query_ids), list(self.modules), self.fingerprint or "")

    def logged_ids(self) -> set[DataId]:
        """The ids stored in the current segment (log mode, after `watch`): what to skip when
        resuming after a crash, shards written just before it included."""
        self._check_log_mode("logged_ids()")
        return self._writer.logged_ids()

    def notice_stale_factors(self, when: str) -> None:
        """A notice per segment whose K-FAC factors logged with the rows do not cover exactly
        the stored rows (after a kill and a resume); queries refuse them (one process only:
        under torch.distributed the query's check is the guarantee)."""
        if self.world_size > 1 or not self._factors.collect or self._writer is None:
            return
        stored = {s: self._writer.logged_ids(s) for s in self._writer.segment_names()}
        for segment, covered, rows in self._factors.stale_segments(stored):
            warn(
                f"logix: {when}, the K-FAC factors of segment {segment!r} of {self.run_dir} cover "
                f"{covered} of its {rows} stored rows (rows logged after their last save were "
                "lost with a kill, or logged by another run): queries refuse them until a "
                "statistics pass recomputes them over every stored row: after logging, "
                "`with run.fit_curvature():` over the training data",
            )

    # -- segments ---------------------------------------------------------------------------
    def start_segment(self, name: str | None = None, **meta: Any) -> str:
        """Start a new segment (an epoch, a checkpoint, a training stage); `meta` is stored with
        it (e.g. `lr=0.1`). Returns its name. Data ids need only be unique within a segment."""
        self._check_log_mode("start_segment")
        self._check_no_step("start_segment")
        self._record_batches()
        if self._statistics is not None:
            self._writer.flush()
            self._statistics.save()
        self._factors.save()
        self._factors.release_saved()
        return self._writer.start_segment(name, meta or None)

    def set_segment_meta(self, **meta: Any) -> None:
        """Record facts about the current segment (e.g. `lr=0.1, step=1000`); JSON values."""
        self._check_log_mode("set_segment_meta")
        self._writer.update_segment_meta(meta)

    def segment_meta(self) -> dict[str, Any]:
        """The facts recorded about the current segment (see `set_segment_meta`)."""
        self._check_log_mode("segment_meta")
        return self._writer.segment_meta(self.segment)

    @property
    def segment(self) -> str:
        """The segment rows are written to (the first one, "0", is created on first use)."""
        self._check_log_mode("segment")
        if self._writer.segment is None:
            self._writer.start_segment()
        return self._writer.segment

    # -- the end ----------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every pending row to disk now (waits for the writer)."""
        self._check_no_step("flush")
        if self._writer is not None:
            self._record_batches()
            self._writer.flush()
            if self._statistics is not None:
                self._statistics.save()
            self._factors.save()

    def finalize(self) -> None:
        """Flush and close the store; save curvature statistics. Safe to call twice.

        Under torch.distributed every rank calls it: after a barrier rank 0 checks that the
        ranks' data ids are disjoint and records the ranks in the manifest."""
        if self._finalized:
            return
        self._check_no_step("finalize")
        self._finalized = True
        later: Exception | None = None  # raised once the writer is closed and its lock released
        if self._trajectory is not None:
            try:
                self._trajectory.close()
            except Exception as e:  # noqa: BLE001 - raised below
                later = e
        if self._writer is None:
            if later is not None:
                raise later
            return
        error: Exception | None = None
        try:
            self._record_batches()
            self._writer.close()
            self._factors.save()  # K-FAC factors stay one file per rank (summed on load)
            self.notice_stale_factors("at finalize")
        except Exception as e:  # noqa: BLE001 - raised after the other ranks are released
            error = e
            self._writer.abandon("closing it failed")
        ok = error is None
        error = error or later
        try:
            failed = finish_logging(self.run_dir, ok=ok)  # collective under torch.distributed
        except Exception:
            if self._statistics is not None and ok:
                self._statistics.save()  # this rank's own file: its rows are complete
            raise
        if self._statistics is not None:
            finish_statistics(self._statistics, ok, failed)
        record_ranks(self.run_dir)
        if error is not None:
            raise error

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.finalize()
        except Exception:
            if exc_type is None:
                raise
        return False

    def _check_open(self) -> None:
        if self._finalized:
            raise CaptureError("this run is finalized; open it again with logix.init(..., resume=True)")

    def _check_no_step(self, what: str) -> None:
        if self._active is not None:
            raise CaptureError(f"{what}() cannot be called inside a `with run(data_id=...)` block")

    def _check_log_mode(self, what: str) -> None:
        if self.mode != "log" or self._writer is None:
            raise CaptureError(f"{what} needs a logging run that watches a model (call run.watch first)")

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, mode={self.mode!r}, modules={len(self.modules)})"
