"""`Run`: the three lines in a training loop. Ties capture → store (→ curvature statistics).

    run = logix.init("runs/digits", config="configs/digits.yaml")
    run.watch(model)
    with run(data_id=ids):
        loss.backward()
    run.finalize()

In `mode="log"` rows go to a store on disk through a background writer; in `mode="query"` the
run reopens an existing store's projections and keeps gradients in memory (`run.gradients()`).
A Run holds all of its state: two runs in one process are independent. Its base classes
(`fit_passes.py`, `lifecycle.py`), blocks and passes (`block.py`, `log_pass.py`, `passes.py`)
are the only code that touches that state.

K-FAC factors (`curvature.statistics` with kfac / ekfac) are summed by the capture hooks in
log mode, per segment, and saved with the rows at flush / finalize / start_segment as
`curvature/<segment>/kfac-rNNNNN.safetensors`; `run.fit_curvature()` computes them for a store
logged without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from logix.capture.attention import attention_parameters
from logix.capture.coverage import Coverage, check_uncovered, model_coverage
from logix.capture.coverage_table import print_coverage
from logix.capture.fired import FirstBlockWatch, check_fired
from logix.capture.functional_uses import FunctionalUses
from logix.capture.hooks import ModuleCapture, check_batch_mask
from logix.capture.modules import check_model, module_table, select_modules
from logix.capture.pca import CovarianceSink
from logix.capture.per_sample import has_bias
from logix.capture.projection import ModuleProjection, load_projections, make_side
from logix.capture.tokens import TokenGradients, check_token_request
from logix.capture.trajectory import TrajectoryRecorder
from logix.comm import rank_and_world
from logix.config import LogixConfig
from logix.curvature.factor_log import FactorLog, check_factor_dims
from logix.errors import CaptureError
from logix.run.block import Block
from logix.run.fit_passes import RunFitPasses
from logix.run.lifecycle import RunLifecycle
from logix.run.log_pass import LogPass
from logix.run.passes import StatisticsPass
from logix.run.setup import create_run_store, module_dims, open_run_dir, open_trajectory, open_writer
from logix.store.format import PROJECTIONS, ModuleInfo, total_width
from logix.store.ids import DataId
from logix.store.projections import check_projections
from logix.store.writer import batch_ids
from logix.vocabulary import FACTOR_STATISTICS, FITTED_PROJECTION_KINDS


class Run(RunFitPasses, RunLifecycle):
    """A logging (or query) run bound to one run directory and, after `watch`, one model."""

    def __init__(
        self,
        run_dir: str | Path,
        config: LogixConfig | dict | str | Path | None = None,
        *,
        mode: str = "log",
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.mode = mode
        self.rank, self.world_size = rank_and_world()
        self._manifest, self.config = open_run_dir(self.run_dir, config, mode, resume, overwrite, self.rank)
        self.modules: list[ModuleInfo] = []
        self.width = 0
        self.fingerprint: str | None = None
        self._model: nn.Module | None = None
        self._projections: dict[str, ModuleProjection] | None = None
        self._captures: list[ModuleCapture] = []
        self._uses: FunctionalUses | None = None  # uses outside module hooks (attention, tied)
        self._covariances: CovarianceSink | None = None  # the PCA statistics pass's sums
        self._log_pass = LogPass(self)
        self._pass: StatisticsPass | None = None  # an open fit_projections / fit_curvature pass
        self._active: Block | None = None
        self._writer = None
        self._statistics = None
        self._factors = FactorLog(self.run_dir, self.rank)  # K-FAC factor sums (log mode)
        self._query_rows: list[torch.Tensor] = []
        self._query_ids: list[DataId] = []
        self._pending_batches: dict[str, int] = {}  # segment -> batches logged, not yet in its meta
        self._token_parts: list[TokenGradients] = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        self._trajectory: TrajectoryRecorder | None = None  # run.watch(model, optimizer=opt)
        self._rerun_ids: set = set()  # stored ids a resumed trajectory's training logs again
        self._finalized = False
        self._coverage: Coverage | None = None  # what watch captures of the model
        self._first_block: FirstBlockWatch | None = None  # weight hooks until a block is checked
        self._fired_checked = False  # the first clean block's unfired-module check ran

    # -- set-up ---------------------------------------------------------------------------
    def watch(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        trajectory_every: int | None = None,
        total_steps: int | None = None,
    ) -> Run:
        """Choose the modules to capture (from the config), set up projections and the store.
        With `optimizer` (log mode), also record the trajectory for `logix.unroll`: every step's
        block ids and hyperparameters, a checkpoint every `trajectory_every` (≈√total_steps) steps."""
        if self._model is not None:
            raise CaptureError("this run already watches a model; use one run per model")
        cfg = self.config
        resumed = self._manifest is not None
        selected = select_modules(model, cfg.capture)
        also = attention_parameters(selected, cfg.capture.bias)  # MultiheadAttention's own weights
        self._coverage = model_coverage(model, selected, cfg.capture, also_captured=also)
        if self.rank == 0:
            print_coverage(self._coverage)
        check_uncovered(self._coverage, cfg.capture)  # before anything is written
        self.modules = module_table(selected, self.config)
        self.width = total_width(self.modules)  # D
        if self.mode == "log" and any(k in FACTOR_STATISTICS for k in cfg.curvature.statistics):
            check_factor_dims(self.modules)  # before anything is written
        self._model = model
        bias = cfg.capture.bias
        self._captures = [
            ModuleCapture(i, name, module, None, has_bias(module, bias), info.offset)
            for i, ((name, module), info) in enumerate(zip(selected, self.modules))
        ]
        if self._manifest is not None:
            check_model(self._manifest, self.modules, self.run_dir)
            self.fingerprint = self._manifest["fingerprint"]
            check_projections(self.run_dir, self._manifest, required=True)
            self._start(load_projections(self.run_dir / PROJECTIONS, module_dims(self.modules)))
            self.notice_stale_factors("on resume")
        elif cfg.projection.kind in FITTED_PROJECTION_KINDS:
            self._covariances = CovarianceSink()  # projections come from `run.fit_projections()`
        else:
            notes: list[str] = []
            p = cfg.projection
            self._start(
                self._create_store(
                    {
                        m.name: ModuleProjection(
                            make_side(p.kind, m.name, "in", m.d_in, p.rank_in, p.seed, notes),
                            make_side(p.kind, m.name, "out", m.d_out, p.rank_out, p.seed, notes),
                        )
                        for m in self.modules
                    },
                    notes,
                )
            )
        if optimizer is not None:
            try:
                self._trajectory, self._rerun_ids = open_trajectory(
                    self.run_dir,
                    self.mode,
                    model,
                    optimizer,
                    trajectory_every,
                    total_steps,
                    cfg,
                    self._writer if resumed else None,
                )
            except BaseException:
                if self._writer is not None:  # a failed watch holds no lock (nothing was logged)
                    self._writer.abandon("run.watch failed; open the run again with logix.init")
                raise
        return self

    @property
    def trajectory_step(self) -> int:
        """The optimizer step the recorded trajectory is at: after a resume, the step to train
        from (its last complete step); 0 without a trajectory."""
        return self._trajectory.step if self._trajectory is not None else 0

    def restore_trajectory(self) -> int:
        """Load the state a resumed trajectory continues from (parameters and optimizer state
        before `trajectory_step`) into the watched model and optimizer; returns that step, the
        one to train from (0 for a new recording, which is left as it is)."""
        if self._trajectory is None:
            raise CaptureError("restore_trajectory() needs run.watch(model, optimizer=opt) first")
        return self._trajectory.restore()

    def take_rerun_ids(self, ids: list[DataId]) -> set[DataId]:
        """Of a block's ids, those whose rows the store holds from before a resumed trajectory's
        step (logged again by the resumed training: not written twice); each is taken once."""
        if not self._rerun_ids:
            return set()
        again = {i for i in ids if i in self._rerun_ids}
        self._rerun_ids -= again
        return again

    def _start(self, projections: dict[str, ModuleProjection]) -> None:
        """Capture with these projections; in log mode, open the writer."""
        self._projections = projections
        self._captures = [
            ModuleCapture(c.index, c.name, c.module, projections[c.name], c.bias, c.offset)
            for c in self._captures
        ]
        if self.mode == "log":
            self._factors.start(self.modules, self.config.curvature.statistics)
            self._writer, self._statistics = open_writer(
                self.run_dir, self.config, self.modules, self.width, self.rank
            )

    def _create_store(
        self, projections: dict[str, ModuleProjection], notes: list[str], info: dict | None = None
    ) -> dict[str, ModuleProjection]:
        self._manifest, projections = create_run_store(
            self.run_dir, self.config, self.modules, projections, notes, self.rank, self.world_size, info
        )
        self.fingerprint = self._manifest["fingerprint"]
        return projections

    # -- public state -----------------------------------------------------------------------
    def coverage(self) -> Coverage:
        """What `watch` captures of the model: watched modules by type, and every parameter not
        captured, by module type, with counts and shares (the table printed at watch)."""
        if self._coverage is None:
            raise CaptureError("run.coverage() describes a watched model: call run.watch(model) first")
        return self._coverage

    @property
    def model(self) -> nn.Module | None:
        """The watched model (None before `watch`)."""
        return self._model

    @property
    def projections(self) -> dict[str, ModuleProjection]:
        """Module name -> its projection (P_in, P_out), as the hooks apply them."""
        if self._projections is None:
            raise CaptureError(
                "the run has no projections yet: call run.watch(model) (and, for "
                "projection.kind 'pca', run the `with run.fit_projections():` pass)"
            )
        return dict(self._projections)

    @property
    def covariances(self) -> CovarianceSink | None:
        """The PCA statistics pass's sums (`.xx`, `.gg` per module); None without one."""
        return self._covariances

    @property
    def active_block(self) -> Block | None:
        """The `with run(...)` / `with fit(...)` block now open, if any."""
        return self._active

    @property
    def writer(self):
        """The store's row writer (log mode, after watch), else None."""
        return self._writer

    @property
    def factor_log(self) -> FactorLog:
        return self._factors

    def is_capturing(self) -> bool:
        """Whether blocks can capture rows: watched, with projections."""
        return self._projections is not None

    def captures(self) -> list[ModuleCapture]:
        """The capture hooks of the watched modules."""
        return self._captures

    def functional_uses(self) -> FunctionalUses:
        """The capture of the watched weights' uses outside their modules' hooks (attention,
        tied weights, `F.linear` in the model's code), attached to every block after `captures()`."""
        if self._uses is None or self._uses.captures is not self._captures:
            self._uses = FunctionalUses(self._model, self._captures)
        return self._uses

    # -- the loop ---------------------------------------------------------------------------
    def __call__(
        self,
        data_id: Any,
        mask: torch.Tensor | None = None,
        *,
        per_token: bool = False,
        token_ids: torch.Tensor | None = None,
    ) -> Block:
        """A context for one batch: `data_id` gives one id per example; `mask` [B, T] marks real
        (1) and padded (0) positions of sequence inputs. `per_token=True` (query mode) keeps each
        position's factors for `token_gradients()` instead of summing them into `gradients()`
        rows; `token_ids` [B, T] are kept with them for display. Inside a statistics pass that
        backpropagates the user's loss, the block is that pass's (as `fit(data_id=ids)`)."""
        self._check_open()
        ids = batch_ids(data_id)
        check_batch_mask(mask, len(ids))
        check_token_request(self.mode, len(ids), mask, per_token, token_ids)
        if self._trajectory is not None:
            self._trajectory.add_block(ids)
        owner = self._pass if self._pass is not None else self._log_pass
        return Block(owner, ids, mask, per_token=per_token, token_ids=token_ids, via_run=True)

    def enter_block(self, block: Block) -> None:
        if not block.owner.needs_logits and self.config.capture.attribution_only:
            self._frozen = [(p, p.requires_grad) for p in self._model.parameters()]
            for p, _ in self._frozen:
                p.requires_grad_(False)
        if not self._fired_checked:
            self._first_block = FirstBlockWatch(self._captures)
        self._active = block

    def exit_block(self, block: Block) -> None:
        self._active = None
        if self._first_block is not None:
            self._first_block.remove()
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen = []

    def check_first_block(self, block: Block) -> None:
        """At the end of the first clean block: every watched module fired (`capture/fired.py`)."""
        if self._fired_checked:
            return
        watch, self._first_block = self._first_block, None
        self._fired_checked = check_fired(self._captures, block.capture, watch, self.config.capture.unfired)
