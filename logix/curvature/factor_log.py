"""The K-FAC factor sums a log-mode run keeps, per segment, and their files.

A step's sums (float32, filled by the hooks' `FactorSink`) are added to its segment's float64 sums only once
the step's rows were accepted; each segment is saved as `curvature/<segment>/kfac-r<rank>` at
flush / finalize / start_segment, and a resumed run continues from its rank's file. During an
empirical `run.fit_curvature()` pass (`fit_segment`), the pass's sums replace the segment's.

Each file records which rows it covers (`statistics.ids_coverage` of their ids): after a kill,
the rows written since the last save are on disk but not in the factors, and a resumed run only
adds the rows it logs itself. `stale_segments` finds such segments (a notice at resume and at
finalize) and the query refuses their factors (`kfac.load_factors`) until a statistics pass
(`run.fit_curvature()`) has recomputed them over every stored row.
"""

from __future__ import annotations

from pathlib import Path

import torch

from logix.capture.factors import MAX_FACTOR_DIM, KroneckerSums
from logix.capture.hooks import check_gradient_reached
from logix.comm import barrier
from logix.curvature.kfac import FACTOR_KIND, factor_path, read_factors, retire_other_ranks, save_factors
from logix.curvature.statistics import COVERAGE_MODULUS, ids_coverage
from logix.errors import CaptureError
from logix.notices import warn
from logix.store.format import ModuleInfo
from logix.vocabulary import FACTOR_STATISTICS


def check_factor_dims(modules: list[ModuleInfo]) -> None:
    """K-FAC factors are [r, r] float64 per side: refuse sides too wide for them, clearly."""
    for m in modules:
        if max(m.r_in, m.r_out) > MAX_FACTOR_DIM:
            side = "r_in" if m.r_in > MAX_FACTOR_DIM else "r_out"
            raise CaptureError(
                f"module {m.name!r} has {side} = {max(m.r_in, m.r_out)}: its K-FAC factor would "
                f"be a {max(m.r_in, m.r_out)}² float64 matrix; K-FAC factors are for sides of at "
                f"most {MAX_FACTOR_DIM}. Project that module (projection.kind random/pca with a "
                "smaller rank) or add it to capture.exclude"
            )


class FactorLog:
    """Per-segment K-FAC factor sums of one rank of a log-mode run."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.modules: list[ModuleInfo] = []
        self.dims: dict[str, tuple[int, int]] = {}  # module -> (r_in, r_out)
        self.step: KroneckerSums | None = None  # the current step's float32 sums
        self.collect = False  # summed during logging (curvature.statistics has kfac / ekfac)
        self.fit_segment: str | None = None  # the segment of a running fit_curvature pass
        self.sums: dict[str, KroneckerSums] = {}  # segment -> float64 sums
        self.covers: dict[str, int | None] = {}  # segment -> ids_coverage of its rows summed
        self.fitted: set[str] = set()  # segments whose sums come from a fit_curvature pass
        self.changed: set[str] = set()

    def start(self, modules: list[ModuleInfo], statistics: list[str] | tuple[str, ...]) -> None:
        """Set up for the watched modules; `statistics` is the config's curvature.statistics."""
        self.modules = list(modules)
        self.dims = {m.name: (m.r_in, m.r_out) for m in modules}
        self.step = KroneckerSums(self.dims, dtype=torch.float32)
        self.collect = any(k in FACTOR_STATISTICS for k in statistics)

    def step_sums(self) -> KroneckerSums | None:
        """The sums a new step adds to (None when no factors are wanted)."""
        return self.step if self.collect or self.fit_segment is not None else None

    def segment_sums(self, segment: str) -> KroneckerSums:
        """The float64 sums of `segment`; a resumed run continues its own rank's file."""
        sums = self.sums.get(segment)
        if sums is None:
            sums = self.sums[segment] = KroneckerSums(self.dims)
            saved = read_factors(factor_path(self.run_dir, segment, self.rank))
            self.covers[segment] = 0
            if saved is not None and saved.modules == self.modules:
                sums.load(saved.tensors, saved.positions, saved.rows)
                self.covers[segment] = saved.covers  # None (not recorded): stays unknown
                if saved.fitted:
                    self.fitted.add(segment)
        return sums

    def stale_segments(self, stored: dict[str, set]) -> list[tuple[str, int, int]]:
        """(segment, rows covered, rows stored) of the segments in `stored` (segment -> ids of
        this rank's stored rows) whose factor file (plus the sums not saved yet) does not cover
        exactly those rows; segments without factors are left out."""
        out = []
        for segment, ids in stored.items():
            if segment not in self.sums and not factor_path(self.run_dir, segment, self.rank).exists():
                continue
            sums = self.segment_sums(segment)
            covers = self.covers.get(segment)
            if sums.examples != len(ids) or (covers is not None and covers != ids_coverage(ids)):
                out.append((segment, sums.examples, len(ids)))
        return out

    @staticmethod
    def check_scale(row_scale: torch.Tensor | float) -> None:
        """Refuse a per-example row scale (before anything of the step is stored): K-FAC sums
        over the batch cannot take one weight per example."""
        if isinstance(row_scale, torch.Tensor):
            raise CaptureError(
                "per-example scale_rows cannot be folded into K-FAC factors summed over the batch; "
                "log without 'kfac'/'ekfac' in curvature.statistics and compute the factors "
                "afterwards with run.fit_curvature()"
            )

    def commit_fit_step(
        self, ids: list, reached: set[int], row_scale: torch.Tensor | float, nonfinite: str
    ) -> None:
        """A step of a fit_curvature pass: its sums join the pass's, unless they are not finite
        (an error, or a warning and nothing added with `Block.skip_if_nonfinite()`)."""
        self.check_scale(row_scale)
        if not self.step.is_finite():
            if nonfinite == "skip":
                warn(
                    f"skipped a batch of {len(ids)} examples whose K-FAC factors are not "
                    f"finite (first ids {ids[:5]})",
                )
                return
            raise CaptureError(
                f"non-finite K-FAC factors for data ids {ids[:10]}: is the loss "
                "NaN? Nothing of this batch was added"
            )
        self.commit(self.fit_segment, ids, reached, row_scale)

    def commit(
        self, segment: str, ids: list, reached: set[int], row_scale: torch.Tensor | float = 1.0
    ) -> None:
        """Add the step's sums to `segment` (after its rows were accepted); `reached`: the
        modules its backward reached. Rows scaled by a number c (`Block.scale_rows`) have
        output gradients scaled by c: S gets c²."""
        self.check_scale(row_scale)
        check_gradient_reached(reached)
        sums = self.sums[segment] if self.fit_segment else self.segment_sums(segment)
        if not self.fit_segment:
            self.fitted.discard(segment)  # logged rows join them: no longer a pass's choice
        self.step.commit(sums, len(ids), gradient_scale=float(row_scale) ** 2)
        covers = self.covers.get(segment)
        if covers is not None:
            self.covers[segment] = (covers + ids_coverage(ids)) % COVERAGE_MODULUS
        self.changed.add(segment)

    def save(self) -> None:
        """Write the factors of every segment that changed since the last save."""
        if not self.changed:
            return
        for segment in sorted(self.changed):
            sums = self.sums[segment]
            save_factors(
                factor_path(self.run_dir, segment, self.rank),
                self.modules,
                sums.tensors(),
                sums.position_counts(),
                sums.examples,
                extra={"segment": segment, "rank": str(self.rank)},
                covers=self.covers.get(segment),
                fitted=segment in self.fitted,
            )
        self.changed.clear()

    def release_saved(self) -> None:
        """Drop the sums of finished segments (logging into one again continues from its file)."""
        self.sums = {k: v for k, v in self.sums.items() if k == self.fit_segment}
        self.covers = {k: v for k, v in self.covers.items() if k in self.sums}

    def begin_fit(self, segment: str) -> None:
        """A fit_curvature pass over `segment`: its sums start from zero and replace the file."""
        self.sums[segment] = KroneckerSums(self.dims)
        self.covers[segment] = 0
        self.fit_segment = segment

    def end_fit(self, ok: bool, world_size: int = 1) -> None:
        """Save the pass's sums (this rank's file replaced; files of ranks beyond this pass's
        world deleted by rank 0 once all have written), or drop them after an error."""
        segment, self.fit_segment = self.fit_segment, None
        if ok:
            self.changed.add(segment)
            self.fitted.add(segment)
            self.save()
            barrier()
            if self.rank == 0:
                retire_other_ranks(self.run_dir, segment, FACTOR_KIND, world_size)
        else:
            self.sums.pop(segment, None)  # the files on disk stay as they were
            self.covers.pop(segment, None)
