"""`Run`: the three lines in a training loop. Ties capture → store (→ curvature statistics).

    run = logix.init("runs/digits", config="configs/digits.yaml")
    run.watch(model)
    with run(data_id=ids):
        loss.backward()
    run.finalize()

In `mode="log"` rows go to a store on disk through a background writer; in `mode="query"` the
run reopens an existing store's projections and keeps gradients in memory (`run.gradients()`).
A Run holds all of its state: two runs in one process are independent.

K-FAC factors (`curvature.statistics` with kfac / ekfac) are summed by the capture hooks in
log mode, per segment, and saved with the rows at flush / finalize / start_segment as
`curvature/<segment>/kfac-rNNNNN.safetensors`; `run.fit_curvature()` computes them for a store
logged without them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from logix.capture.hooks import (
    CaptureError,
    ModuleCapture,
    StepState,
    check_batch_mask,
    check_gradient_reached,
)
from logix.capture.modules import check_model, module_table, select_modules
from logix.capture.pca import CovarianceCollector
from logix.capture.pca_fisher import TrueFisherProjectionFit
from logix.capture.per_sample import has_bias
from logix.capture.projection import (
    ModuleProjection,
    load_projections,
    make_side,
    projections_bytes,
)
from logix.capture.tokens import TokenGradients, check_token_request
from logix.config import LogixConfig
from logix.vocabulary import FITTED_PROJECTION_KINDS
from logix.curvature.covariance import FACTOR_KINDS
from logix.comm import all_reduce_sum, barrier, rank_and_world
from logix.curvature.reduce import finish_statistics
from logix.store.finalize import finish_logging, record_ranks
from logix.run_factors import FactorLog, check_factor_dims
from logix.store.create import create_store, remove_store
from logix.step import CurvatureFit, ProjectionFit, Step
from logix.store.format import (
    FORMAT_NAME,
    MANIFEST,
    PROJECTIONS,
    ModuleInfo,
    StoreError,
    read_json,
    total_width,
)
from logix.store.gradients import DataId, Gradients
from logix.store.writer import StoreWriter, batch_ids, nonfinite_rows

if TYPE_CHECKING:
    from logix.curvature.fit import TrueFisherFit

MODES = ("log", "query")





class Run:
    """A logging (or query) run bound to one run directory and, after `watch`, one model."""

    def __init__(self, run_dir: str | Path, config: LogixConfig | dict | str | Path | None = None,
                 *, mode: str = "log", resume: bool = False, overwrite: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.run_dir = Path(run_dir)
        self.mode = mode
        self.rank, self.world_size = rank_and_world()
        exists = (self.run_dir / MANIFEST).exists()
        if mode == "log":
            barrier()  # under torchrun: every rank has looked before rank 0 creates or removes it
        if mode == "query":
            if not exists:
                raise StoreError(f"{self.run_dir} holds no logix store (no {MANIFEST}); log one first")
            if config is not None:
                raise ValueError("a query-mode run takes its config from the store; do not pass config")
        elif exists and not (resume or overwrite):
            raise StoreError(
                f"{self.run_dir} already holds a logix store; pass resume=True to append to it "
                "or overwrite=True to replace it"
            )
        self._manifest: dict | None = read_json(self.run_dir / MANIFEST) if exists else None
        if self._manifest is not None and self._manifest.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.run_dir / MANIFEST} is not a logix manifest")
        if mode == "log" and exists and overwrite:
            if self.rank == 0:
                remove_store(self.run_dir)
            self._manifest = None
        if self._manifest is not None:
            stored = LogixConfig.load(self._manifest["config"])
            if config is not None and LogixConfig.load(config).to_dict() != stored.to_dict():
                raise StoreError(
                    f"the config differs from the one {self.run_dir} was logged with; resume with "
                    "the same config (or config=None to reuse it), or log into a new directory"
                )
            self.config = stored
        else:
            self.config = LogixConfig.load(config)
        self.modules: list[ModuleInfo] = []
        self.width = 0
        self.fingerprint: str | None = None
        self._captures: list[ModuleCapture] | None = None
        self._selected: list[tuple[str, nn.Module]] = []
        self._collector: CovarianceCollector | None = None
        self._fitting = False
        self._active: Step | None = None
        self._writer = None
        self._statistics = None
        self._factors = FactorLog(self.run_dir, self.rank)  # K-FAC factor sums (log mode)
        self._query_rows: list[torch.Tensor] = []
        self._query_ids: list[DataId] = []
        self._pending_batches: dict[str, int] = {}  # segment -> batches logged, not yet in its meta
        self._token_parts: list[TokenGradients] = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        self._model: nn.Module | None = None
        self._finalized = False

    # -- set-up ---------------------------------------------------------------------------
    def watch(self, model: nn.Module) -> "Run":
        """Choose the modules to capture (from the config), set up projections and the store."""
        if self._model is not None:
            raise CaptureError("this run already watches a model; use one run per model")
        cfg = self.config
        selected = select_modules(model, cfg.capture)
        self.modules = module_table(selected, self.config)
        self.width = total_width(self.modules)  # D
        if self.mode == "log" and any(k in FACTOR_KINDS for k in cfg.curvature.statistics):
            check_factor_dims(self.modules)  # before anything is written
        self._model = model
        self._selected = selected
        if self._manifest is not None:
            check_model(self._manifest, self.modules, self.run_dir)
            dims = {m.name: (m.d_in, m.d_out, m.r_in, m.r_out) for m in self.modules}
            self.fingerprint = self._manifest["fingerprint"]
            self._start(load_projections(self.run_dir / PROJECTIONS, dims))
        elif cfg.projection.kind in FITTED_PROJECTION_KINDS:
            # The projections come from a statistics pass: `with run.fit_projections(): ...`.
            self._collector = CovarianceCollector(
                [(name, module, has_bias(module, cfg.capture.bias)) for name, module in selected])
        else:
            notes: list[str] = []
            p = cfg.projection
            self._start(self._create_store(self.modules, {
                m.name: ModuleProjection(
                    make_side(p.kind, m.name, "in", m.d_in, p.rank_in, p.seed, notes),
                    make_side(p.kind, m.name, "out", m.d_out, p.rank_out, p.seed, notes),
                )
                for m in self.modules
            }, notes))
        return self

    def _start(self, projections: dict[str, ModuleProjection]) -> None:
        """Hooks for every watched module, and the writer in log mode."""
        bias = self.config.capture.bias
        self._captures = [
            ModuleCapture(i, name, module, projections[name], has_bias(module, bias), info.offset)
            for i, ((name, module), info) in enumerate(zip(self._selected, self.modules))
        ]
        if self.mode == "log":
            self._factors.start(self.modules, self.config.curvature.statistics)
            self._open_writer()

    def fit_curvature(self, segment: str | None = None, *, fisher: str = "empirical",
                      statistics: list[str] | tuple[str, ...] | None = None, mass: float = 1.0,
                      on_rows: Callable[[list, torch.Tensor], None] | None = None,
                      ) -> CurvatureFit | TrueFisherFit:
        """A pass over training data that computes curvature statistics needing the model, for
        a segment (default: the current one), without writing rows. The files are saved on exit,
        replacing this rank's previous ones of that segment. For an existing store: open it with
        `logix.init(path, resume=True)`, `run.watch(model)` (the model at that segment's
        checkpoint), run the pass, `run.finalize()`. The model is not changed.

        fisher="empirical": the K-FAC factors (`curvature/<segment>/kfac-r<rank>.safetensors`)
        of a store logged without them; inside `with run.fit_curvature():`, run `with
        run(data_id=ids): loss.backward()` blocks over the training data.

        fisher="true": the Fisher under the model's own predictions (Gauss–Newton), read by
        `InfluenceEngine(..., fisher="true")`; statistics: any of raw (default), kfac, ekfac
        (ekfac in a second pass after kfac), saved as `<kind>.true-r<rank>.safetensors`:

            with run.fit_curvature(fisher="true") as fit:
                for ids, x in batches:
                    with fit(data_id=ids):           # mask=: the padding mask, as in run(...)
                        fit.backward(model(x))       # logits [B, C] or [B, T, V] (+ label_mask=)

        mass < 1 keeps, per position, the most probable classes up to that probability mass
        (`logix.capture.fisher`); on_rows(ids, rows [n, D]) receives every pass's pseudo-
        gradient rows with the data id of each (e.g. for an exact reference on a small model).
        Cost: one backward per class (and target position) per batch; see `curvature/fit.py`.
        """
        if fisher not in ("empirical", "true"):
            raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if fisher == "empirical" and (statistics is not None or mass != 1.0 or on_rows is not None):
            raise ValueError("statistics, mass and on_rows are options of fisher='true'; the "
                             "empirical pass computes the K-FAC factors")
        if self.mode != "log":
            raise CaptureError("fit_curvature writes statistics into the store: open it with "
                               "logix.init(run_dir, resume=True), not mode='query'")
        if self._collector is not None:
            raise CaptureError(f"projection.kind {self.config.projection.kind!r} needs `with "
                               "run.fit_projections():` and some logged rows before fit_curvature")
        self._check_log_mode("fit_curvature")
        self._check_no_step("fit_curvature")
        self._check_open()
        if self._factors.fit_segment is not None:
            raise CaptureError("fit_curvature() passes cannot be nested")
        names = self._writer.segment_names()
        if segment is None:
            if self._writer.segment is None:
                raise CaptureError("the store has no segment yet: log some rows first, or pass "
                                   "fit_curvature(segment=NAME) of an existing segment")
            segment = self._writer.segment
        elif segment not in names:
            raise CaptureError(f"segment {segment!r} does not exist in {self.run_dir}; its segments: {names}")
        kinds = tuple(statistics) if statistics is not None else ("raw",)
        if fisher == "empirical" or "kfac" in kinds:
            check_factor_dims(self.modules)
        if fisher == "empirical":
            return CurvatureFit(self, segment)
        from logix.curvature.fit import TrueFisherFit

        return TrueFisherFit(self, segment, statistics=kinds, mass=mass, on_rows=on_rows)

    def fit_projections(self, fisher: str = "empirical") -> ProjectionFit | TrueFisherProjectionFit:
        """The statistics pass of `projection.kind: pca`: inside `with run.fit_projections():`,
        `with run(data_id=ids): loss.backward()` blocks accumulate each module's activation and
        output-gradient covariances; on exit P_in, P_out become their top eigenvectors and the
        store is created. Nothing is written during the pass; the model is not changed.
        fisher="true": the output side under the model's own predictions (Gauss–Newton), with
        `with run.fit_projections(fisher="true") as fit:` / `with fit(data_id=ids):
        fit.backward(model(x))`; see `logix.capture.pca_fisher`."""
        if self._collector is None:
            raise CaptureError(
                "fit_projections() is for a new store with projection.kind 'pca' or 'kfac-whitened', "
                "after run.watch(model)"
            )
        self._collector.begin(fisher)
        return TrueFisherProjectionFit(self) if fisher == "true" else ProjectionFit(self)

    def _finish_fit(self) -> None:
        collector, self._collector = self._collector, None
        if self.world_size > 1:  # every rank must derive the same projections
            for sums in (collector.xx, collector.gg, collector.counts):
                for name in sorted(sums):
                    sums[name] = all_reduce_sum(sums[name])  # on the backend's device
        p = self.config.projection
        notes: list[str] = []
        projections = {m.name: ModuleProjection(*collector.sides(
            m.name, p.rank_in, p.rank_out, notes, kind=p.kind, damping=p.damping, seed=p.seed))
            for m in self.modules}
        self._start(self._create_store(self.modules, projections, notes,
                                       {"pca_fisher": collector.fisher}))




    def _create_store(self, modules: list[ModuleInfo], projections: dict[str, ModuleProjection],
                      notes: list[str], info: dict | None = None) -> dict[str, ModuleProjection]:
        """Create the store (rank 0) and return the projections every rank captures with;
        `info` joins the manifest's projection entry."""
        if self.rank == 0:
            p = self.config.projection
            self._manifest = create_store(
                self.run_dir, self.config.to_dict(), self.config.to_yaml(), modules,
                projections_bytes(projections),
                {"kind": p.kind, "seed": p.seed, "notes": notes, **(info or {})}, self.world_size)
        if self.world_size > 1:  # every rank captures with rank 0's projections
            barrier()
            if self.rank != 0:
                self._manifest = read_json(self.run_dir / MANIFEST)
                dims = {m.name: (m.d_in, m.d_out, m.r_in, m.r_out) for m in modules}
                projections = load_projections(self.run_dir / PROJECTIONS, dims)
        self.fingerprint = self._manifest["fingerprint"]
        return projections

    def _open_writer(self) -> None:
        observers = []
        curvature = self.config.curvature
        row_kinds = [k for k in curvature.statistics if k not in FACTOR_KINDS]
        if row_kinds and curvature.during_logging:
            from logix.curvature.covariance import CurvatureStatistics

            self._statistics = CurvatureStatistics(
                self.run_dir, self.modules, rank=self.rank, kinds=tuple(row_kinds)
            )
            observers.append(self._statistics)
        self._writer = StoreWriter(
            self.run_dir,
            width=self.width,
            dtype=self.config.store.dtype,
            shard_rows=self.config.store.shard_rows,
            rank=self.rank,
            observers=observers,
        )

    # -- the loop ---------------------------------------------------------------------------
    def __call__(self, data_id: Any, mask: torch.Tensor | None = None, *, per_token: bool = False,
                 token_ids: torch.Tensor | None = None) -> Step:
        """A context for one batch: `data_id` gives one id per example; `mask` [B, T] marks real
        (1) and padded (0) positions of sequence inputs. `per_token=True` (query mode) keeps each
        position's factors for `token_gradients()` instead of summing them into `gradients()`
        rows; `token_ids` [B, T] are kept with them for display."""
        self._check_open()
        ids = batch_ids(data_id)
        check_batch_mask(mask, len(ids))
        check_token_request(self.mode, len(ids), mask, per_token, token_ids)
        return Step(self, ids, mask, per_token, token_ids)

    def _submit(self, ids: list[DataId], state: StepState, row_scale: torch.Tensor | float = 1.0,
                nonfinite: str = "raise") -> None:
        check_gradient_reached(state)
        rows = state.rows
        for i, m in enumerate(self.modules):
            if i not in state.written:  # a module this step never used: its gradient is zero
                rows[:, m.columns].zero_()
        if isinstance(row_scale, torch.Tensor):
            rows.mul_(row_scale.to(device=rows.device, dtype=rows.dtype).unsqueeze(1))
        elif row_scale != 1.0:
            rows.mul_(row_scale)
        if nonfinite == "skip" and nonfinite_rows(rows):
            warnings.warn(f"skipped a batch of {len(ids)} examples whose gradients are not finite "
                          f"(first ids {ids[:5]}): nothing of it was stored", stacklevel=3)
            return
        if self.mode == "query":
            bad = [ids[i] for i in nonfinite_rows(rows)]
            if bad:
                raise CaptureError(
                    f"non-finite gradients (NaN/inf) for data ids {bad[:10]}"
                    f"{' …' if len(bad) > 10 else ''}: is the loss NaN? Nothing of this batch was stored"
                )
            self._query_rows.append(rows.to("cpu"))
            self._query_ids.extend(ids)
        else:
            if state.factors is not None:
                self._factors.check_scale(row_scale)  # before the rows are stored
            self._writer.add(ids, rows)  # checks ids and finiteness; takes ownership of rows
            if state.factors is not None:
                self._factors.commit(self._writer.segment, ids, state, row_scale)
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

    def _submit_tokens(self, step: Step) -> None:
        recorder = step.state.tokens
        if not recorder.passes:
            raise CaptureError(
                "no gradient reached any watched module inside `with run(data_id=..., "
                "per_token=True)`: call loss.backward() inside the block (with gradients enabled)")
        part = recorder.finish(step.ids, list(self.modules), self.fingerprint or "", step.mask,
                               step.token_ids)
        bad = [part.data_ids[i] for i in nonfinite_rows(part.gradients().values)]
        if bad:
            raise CaptureError(f"non-finite gradients (NaN/inf) for data ids {bad[:10]}: is the "
                               "loss NaN? Nothing of this batch was kept")
        self._token_parts.append(part)

    def token_gradients(self) -> TokenGradients:
        """The per-position factors captured in `per_token=True` blocks of a query-mode run, for
        `InfluenceEngine.token_scores`: one entry per sequence, positions padded to the longest."""
        if not self._token_parts:
            raise CaptureError("no per-token gradients: capture them inside "
                               "`with query(data_id=ids, mask=mask, per_token=True): loss.backward()`")
        return TokenGradients.concatenate(self._token_parts)

    def _freeze_parameters(self) -> None:
        self._frozen = [(p, p.requires_grad) for p in self._model.parameters()]
        for p, _ in self._frozen:
            p.requires_grad_(False)

    def _restore_parameters(self) -> None:
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen = []

    # -- segments, results, end -----------------------------------------------------------
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

    @property
    def segment(self) -> str:
        """The segment rows are written to (the first one, "0", is created on first use)."""
        self._check_log_mode("segment")
        if self._writer.segment is None:
            self._writer.start_segment()
        return self._writer.segment

    def gradients(self) -> Gradients:
        """The gradients captured by a query-mode run: values [n, D] float32 and data ids."""
        if self.mode != "query":
            raise CaptureError("gradients() is for mode='query' runs; a logging run writes to its store")
        values = torch.cat(self._query_rows) if self._query_rows else torch.zeros(0, self.width)
        return Gradients(values, list(self._query_ids), list(self.modules), self.fingerprint or "")

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
        if self._writer is not None:
            self._record_batches()
            error: Exception | None = None
            try:
                self._writer.close()
                self._factors.save()  # K-FAC factors stay one file per rank (summed on load)
            except Exception as e:  # noqa: BLE001 - raised after the other ranks are released
                error = e
            ok = error is None
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

    def __enter__(self) -> "Run":
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



def init(run_dir: str | Path, config: LogixConfig | dict | str | Path | None = None, *,
         mode: str = "log", resume: bool = False, overwrite: bool = False) -> Run:
    """Open a run directory for logging (`mode="log"`) or for capturing queries (`mode="query"`).

    config: a YAML path, a dict or a LogixConfig (log mode; a query run reuses the store's).
    resume: append to an existing store (after a crash, or a new segment); overwrite: replace it.
    """
    return Run(run_dir, config, mode=mode, resume=resume, overwrite=overwrite)
