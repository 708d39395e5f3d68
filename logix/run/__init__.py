"""The run: `logix.init`, `Run` and its blocks and passes, the stage that ties capture, store
and curvature together (DESIGN §4).

- `run.py`: `Run` (set-up, the loop's entry points); `init` is here;
- `fit_passes.py`: the statistics passes a Run hands out (`fit_curvature`, `fit_projections`);
- `lifecycle.py`: where results go, segments, flush and finalize;
- `setup.py`: the run directory and config, store creation, the row writer;
- `block.py`: `Block` (one batch of any pass) and the `Pass` protocol;
- `log_pass.py`: the run's own logging / query pass; `passes.py`: the statistics passes.
"""

from __future__ import annotations

from pathlib import Path

from logix.config import LogixConfig
from logix.run.block import Block, Pass
from logix.run.passes import StatisticsPass
from logix.run.run import Run


def init(
    run_dir: str | Path,
    config: LogixConfig | dict | str | Path | None = None,
    *,
    mode: str = "log",
    resume: bool = False,
    overwrite: bool = False,
) -> Run:
    """Open a run directory for logging (`mode="log"`) or for capturing queries (`mode="query"`).

    config: a YAML path, a dict or a LogixConfig (log mode; a query run reuses the store's).
    resume: append to an existing store (after a crash, or a new segment); overwrite: replace it.
    """
    return Run(run_dir, config, mode=mode, resume=resume, overwrite=overwrite)


__all__ = ["Block", "Pass", "Run", "StatisticsPass", "init"]
