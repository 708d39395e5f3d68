"""The statistics passes a `Run` hands out (`fit_curvature`, `fit_projections`); a base class of `Run`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from logix.capture.kronecker import KroneckerFactors, kronecker_projections
from logix.capture.projection import ModuleProjection
from logix.capture.whitening import WHITENED_KIND
from logix.comm import all_reduce_sum
from logix.curvature.factor_log import check_factor_dims
from logix.curvature.fit import TrueFisherStatistics
from logix.errors import CaptureError
from logix.run.passes import CurvaturePass, ProjectionPass, StatisticsPass, TrueFisherPass


class RunFitPasses:
    """The passes over training data that compute statistics without writing rows (see
    `logix.run.run.Run`): their factories, and the run's record of the one open."""

    def fit_curvature(
        self,
        segment: str | None = None,
        *,
        fisher: str = "empirical",
        statistics: list[str] | tuple[str, ...] | None = None,
        mass: float = 1.0,
        on_rows: Callable[[list, torch.Tensor], None] | None = None,
        total: int | None = None,
    ) -> StatisticsPass:
        """A pass over training data that computes curvature statistics needing the model, for
        a segment (default: the current one), without writing rows. The files are saved on exit,
        replacing this rank's previous ones of that segment. For an existing store: open it with
        `logix.init(path, resume=True)`, `run.watch(model)` (the model at that segment's
        checkpoint), run the pass, `run.finalize()`. The model is not changed.

            with run.fit_curvature(...) as fit:
                for ids, x, y in batches:
                    with fit(data_id=ids):         # mask=: the padding mask, as in run(...)
                        loss(model(x), y).backward()   # fisher="empirical"
                        # fit.backward(model(x))       # fisher="true": logits [B, C] / [B, T, V]

        fisher="empirical": the K-FAC factors (`curvature/<segment>/kfac-r<rank>.safetensors`)
        of a store logged without them (`with run(data_id=ids):` blocks work too).
        fisher="true": the Fisher under the model's own predictions (Gauss–Newton), read by
        `InfluenceEngine(..., fisher="true")`; statistics: any of raw (default), kfac, ekfac
        (ekfac in a second pass after kfac), saved as `<kind>.true-r<rank>.safetensors`;
        `fit.backward(logits, label_mask=...)` backpropagates one pass per class slot (and
        target position). mass < 1 keeps, per position, the most probable classes up to that
        probability mass (`logix.capture.fisher`); on_rows(ids, rows [n, D]) receives every
        pass's pseudo-gradient rows (e.g. for an exact reference on a small model). total: the
        number of batches the pass will see (e.g. `len(loader)`), for a progress bar on stderr.
        """
        if fisher not in ("empirical", "true"):
            raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if fisher == "empirical" and (statistics is not None or mass != 1.0 or on_rows is not None):
            raise ValueError(
                "statistics, mass and on_rows are options of fisher='true'; the "
                "empirical pass computes the K-FAC factors"
            )
        if self.mode != "log":
            raise CaptureError(
                "fit_curvature writes statistics into the store: open it with "
                "logix.init(run_dir, resume=True), not mode='query'"
            )
        if self._covariances is not None:
            raise CaptureError(
                f"projection.kind {self.config.projection.kind!r} needs `with "
                "run.fit_projections():` and some logged rows before fit_curvature"
            )
        self._check_log_mode("fit_curvature")
        self._check_no_step("fit_curvature")
        self._check_open()
        if self._pass is not None:
            raise CaptureError("fit_curvature() passes cannot be nested")
        names = self._writer.segment_names()
        if segment is None:
            if self._writer.segment is None:
                raise CaptureError(
                    "the store has no segment yet: log some rows first, or pass "
                    "fit_curvature(segment=NAME) of an existing segment"
                )
            segment = self._writer.segment
        elif segment not in names:
            raise CaptureError(f"segment {segment!r} does not exist in {self.run_dir}; its segments: {names}")
        kinds = tuple(statistics) if statistics is not None else ("raw",)
        if fisher == "empirical" or "kfac" in kinds:
            check_factor_dims(self.modules)
        if fisher == "empirical":
            return CurvaturePass(self, segment).show_progress(total)
        stats = TrueFisherStatistics(
            self.run_dir,
            segment,
            self.modules,
            rank=self.rank,
            world_size=self.world_size,
            statistics=kinds,
            mass=mass,
            on_rows=on_rows,
        )
        return TrueFisherPass(self, stats).show_progress(total)

    def fit_projections(self, fisher: str = "empirical", total: int | None = None) -> StatisticsPass:
        """The statistics pass of `projection.kind: pca`: inside `with run.fit_projections():`,
        `with run(data_id=ids): loss.backward()` blocks accumulate each module's activation and
        output-gradient covariances; on exit P_in, P_out become their top eigenvectors and the
        store is created. Nothing is written during the pass; the model is not changed.
        fisher="true": the output side under the model's own predictions (Gauss–Newton), with
        `with run.fit_projections(fisher="true") as fit:` / `with fit(data_id=ids):
        fit.backward(model(x))`; see `logix.run.passes`. total: the number of batches, for a
        progress bar on stderr."""
        if self._covariances is None:
            raise CaptureError(
                "fit_projections() is for a new store with projection.kind 'pca' or 'kfac-whitened', "
                "after run.watch(model)"
            )
        self._covariances.begin(fisher)
        return ProjectionPass(self, fisher).show_progress(total)

    def finish_projections(self) -> None:
        """End of the PCA pass: P_in, P_out from the covariances (summed over ranks); creates
        the store and starts capturing."""
        sums, self._covariances = self._covariances, None
        if self.world_size > 1:  # every rank must derive the same projections
            for part in (sums.xx, sums.gg, sums.counts):
                for name in sorted(part):
                    part[name] = all_reduce_sum(part[name])  # on the backend's device
        p = self.config.projection
        notes: list[str] = []
        projections = {
            m.name: ModuleProjection(
                *sums.sides(m.name, p.rank_in, p.rank_out, notes, kind=p.kind, damping=p.damping, seed=p.seed)
            )
            for m in self.modules
        }
        self._start(self._create_store(projections, notes, {"pca_fisher": sums.fisher}))

    def use_kronecker_factors(self, factors: dict[str, KroneckerFactors], power: float = 0.5) -> None:
        """`projection.kind: kfac-whitened` with the factors supplied instead of fitted: each
        module's left [d_out, d_out] and right [d_in, d_in] factor (e.g. a Shampoo/SOAP
        optimizer's L, R; bias column last, `logix.capture.kronecker`) whiten its sides by
        (C + λ)^{-power}; creates the store and starts capturing. Replaces `fit_projections()`."""
        if self._covariances is None or self.config.projection.kind != WHITENED_KIND:
            raise CaptureError(
                "use_kronecker_factors() is for a new store with projection.kind "
                f"{WHITENED_KIND!r}, after run.watch(model) and before any fit_projections() pass"
            )
        if self._pass is not None or self._covariances.gg:
            raise CaptureError(
                "use_kronecker_factors() replaces the fit_projections() pass: use one or the other"
            )
        p = self.config.projection
        notes: list[str] = []
        dims = {m.name: (m.d_in, m.d_out) for m in self.modules}
        projections = kronecker_projections(
            dims, factors, p.rank_in, p.rank_out, p.damping, p.seed, notes, power=power
        )
        self._covariances = None
        info = {"whitening_factors": "supplied", "whitening_power": power}
        self._start(self._create_store(projections, notes, info))

    def begin_pass(self, owner: StatisticsPass) -> None:
        if self._pass is not None:
            raise CaptureError("statistics passes cannot be nested: finish the open one first")
        if self._active is not None:
            raise CaptureError("a statistics pass cannot start inside a `with run(data_id=...)` block")
        self._pass = owner

    def end_pass(self, owner: StatisticsPass) -> None:
        self._pass = None
