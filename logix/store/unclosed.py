"""What a store writer that its run never closed says when it ends anyway: at interpreter exit,
or when a later writer of the same process takes its rank over (a run whose loop raised and
that was never finalized must not block the next one, nor end silently)."""

from __future__ import annotations

from pathlib import Path

from logix.notices import warn


def pending_outcome(pending: int, error: BaseException | None) -> str:
    """What became of the rows a writer had accepted but not yet written when it ended."""
    return (
        f"its {pending} pending rows were written"
        if error is None
        else f"its pending rows are lost ({error!r})"
    )


def warn_closed_at_exit(run_dir: Path, rank: int, outcome: str) -> None:
    warn(
        f"logix: the store writer of {run_dir} (rank {rank}) was never closed: "
        f"run.finalize() was not called. At exit {outcome}; the rank stays marked not "
        "finalized and statistics kept in memory were not saved. Call run.finalize() at the "
        "end (or use `with logix.init(...) as run:`)",
        RuntimeWarning,
    )


def warn_taken_over(run_dir: Path, rank: int, outcome: str) -> None:
    warn(
        f"logix: an earlier writer of {run_dir} (rank {rank}) in this process was never closed "
        f"(its run.finalize() was not called): it is closed now so that the new one can write; "
        f"{outcome}, and the rank stays marked not finalized until the new run finalizes. End "
        "each run with run.finalize() (or `with logix.init(...) as run:`)",
        RuntimeWarning,
    )
