"""Setting a run up: its directory and config (new, resumed, replaced or queried), the store's
creation with its projections, and the row writer of a log-mode run."""

from __future__ import annotations

from pathlib import Path

from logix.capture.projection import ModuleProjection, load_projections, projections_bytes
from logix.capture.trajectory import TrajectoryRecorder
from logix.comm import barrier
from logix.config import LogixConfig
from logix.curvature.covariance import CurvatureStatistics
from logix.errors import CaptureError, ConfigError, StoreError
from logix.notices import warn
from logix.store.create import create_store, remove_store
from logix.store.format import FORMAT_NAME, MANIFEST, PROJECTIONS, ModuleInfo, read_json
from logix.store.paths import inside
from logix.store.projections import check_projections
from logix.store.writer import StoreWriter
from logix.vocabulary import FACTOR_STATISTICS, RUN_MODES


def open_run_dir(
    run_dir: Path,
    config: LogixConfig | dict | str | Path | None,
    mode: str,
    resume: bool,
    overwrite: bool,
    rank: int,
) -> tuple[dict | None, LogixConfig]:
    """Check the directory against the mode and flags; returns (its manifest or None, the config).

    A log-mode run replaces the store with `overwrite`, appends with `resume` (same config), and
    refuses an existing store otherwise; a query-mode run needs a store and takes its config."""
    if mode not in RUN_MODES:
        raise ConfigError(f"mode must be one of {RUN_MODES}, got {mode!r}")
    if resume and overwrite:
        raise ConfigError(
            "resume=True and overwrite=True contradict each other (resume appends "
            "to the store, overwrite deletes it): pass only one"
        )
    exists = inside(run_dir, MANIFEST).exists()  # a StoreError if the manifest is a link
    if mode == "log":
        barrier()  # under torchrun: every rank has looked before rank 0 creates or removes it
    if mode == "query":
        if not exists:
            raise StoreError(f"{run_dir} holds no logix store (no {MANIFEST}); log one first")
        if config is not None:
            raise ConfigError("a query-mode run takes its config from the store; do not pass config")
    elif exists and not (resume or overwrite):
        raise StoreError(
            f"{run_dir} already holds a logix store; pass resume=True to append to it "
            "or overwrite=True to replace it"
        )
    manifest = read_json(run_dir / MANIFEST) if exists else None
    if manifest is not None and manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{run_dir / MANIFEST} is not a logix manifest")
    if mode == "log" and exists and overwrite:
        if rank == 0:
            remove_store(run_dir)
        manifest = None
    if manifest is None:
        return None, LogixConfig.load(config)
    stored = LogixConfig.load(manifest["config"])
    if config is not None:
        differ = logging_differences(LogixConfig.load(config), stored)
        if differ:
            raise StoreError(
                f"the config differs from the one {run_dir} was logged with ({', '.join(differ)}); "
                "resume with the same config (or config=None to reuse it), or log into a new directory"
            )
    return manifest, stored


def logging_differences(config: LogixConfig, stored: LogixConfig) -> list[str]:
    """The keys, as `section.key`, in which `config` would log differently from `stored`. The
    `query:` section only holds the engine's defaults, so a resumed run may differ there (a
    store logged before a query default changed resumes with today's config file)."""
    new, old = config.to_dict(), stored.to_dict()
    return [
        f"{section}.{key}"
        for section in new
        if section != "query"
        for key in new[section]
        if new[section][key] != old.get(section, {}).get(key)
    ]


def module_dims(modules: list[ModuleInfo]) -> dict[str, tuple[int, int, int, int]]:
    return {m.name: (m.d_in, m.d_out, m.r_in, m.r_out) for m in modules}


def create_run_store(
    run_dir: Path,
    config: LogixConfig,
    modules: list[ModuleInfo],
    projections: dict[str, ModuleProjection],
    notes: list[str],
    rank: int,
    world_size: int,
    info: dict | None = None,
) -> tuple[dict, dict[str, ModuleProjection]]:
    """Create the store (rank 0); returns its manifest and the projections every rank captures
    with (rank 0's); `info` joins the manifest's projection entry."""
    manifest = None
    if rank == 0:
        p = config.projection
        manifest = create_store(
            run_dir,
            config.to_dict(),
            config.to_yaml(),
            modules,
            projections_bytes(projections),
            {"kind": p.kind, "seed": p.seed, "notes": notes, **(info or {})},
            world_size,
        )
    if world_size > 1:  # every rank captures with rank 0's projections
        barrier()
        if rank != 0:
            manifest = read_json(run_dir / MANIFEST)
            check_projections(run_dir, manifest, required=True)
            projections = load_projections(run_dir / PROJECTIONS, module_dims(modules))
    return manifest, projections


def open_writer(
    run_dir: Path, config: LogixConfig, modules: list[ModuleInfo], width: int, rank: int
) -> tuple[StoreWriter, CurvatureStatistics | None]:
    """The row writer, with the row statistics summed while logging (raw, …) as its observer."""
    curvature = config.curvature
    row_kinds = [k for k in curvature.statistics if k not in FACTOR_STATISTICS]
    statistics = None
    if row_kinds and curvature.during_logging:
        statistics = CurvatureStatistics(run_dir, modules, rank=rank, kinds=tuple(row_kinds))
    writer = StoreWriter(
        run_dir,
        width=width,
        dtype=config.store.dtype,
        shard_rows=config.store.shard_rows,
        rank=rank,
        observers=[statistics] if statistics is not None else [],
    )
    return writer, statistics


def open_trajectory(
    run_dir: Path,
    mode: str,
    model,
    optimizer,
    every: int | None,
    total_steps: int | None,
    config: LogixConfig,
    writer: StoreWriter | None = None,
) -> tuple[TrajectoryRecorder, set]:
    """The recorder of `run.watch(model, optimizer=opt)`: a logging run's trajectory for replay,
    and the ids whose rows a resumed training logs again (empty for a new one).

    `writer`: a resumed store's writer. Its trajectory then continues from its last complete
    step c (never reset; see `TrajectoryWriter.resume`), with a notice saying c; the training
    must restart there (`run.restore_trajectory()`), and the rows of the ids that the store
    holds from steps after c are not written again (they are the same rows: the first block
    checks that the state is c's)."""
    if mode != "log":
        raise CaptureError("run.watch(model, optimizer=...) records a trajectory: use a logging run")
    stored = None
    if writer is not None:
        stored = set().union(*(writer.logged_ids(s) for s in writer.segment_names()), writer.logged_ids())
    recorder = TrajectoryRecorder(
        run_dir,
        model,
        optimizer,
        every=every,
        total_steps=total_steps,
        overwrite=True,
        reduction=config.capture.loss_reduction,
        resume=stored,
    )
    if recorder.resumed_from is None:
        return recorder, set()
    rerun = writer.logged_ids() - recorder.recorded_ids
    warn(
        f"logix: the recorded trajectory of {run_dir} continues from step {recorder.step}, its "
        f"last complete step (recorded steps and stored rows before it): restore the model and "
        f"optimizer to that step (run.restore_trajectory()) and train from step {recorder.step} "
        f"(run.trajectory_step). The {len(rerun)} stored ids of later steps are not logged again",
    )
    return recorder, rerun
