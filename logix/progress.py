"""Progress of long operations: one rich bar per phase (rows/s, ETA) on stderr, drawn only
when stderr is a terminal and the caller did not ask for quiet.

Every long loop in logix reports through a `ProgressFn`, `fn(phase, done, total)`: the engine's
passes over a store ("scores", "top_k", "self_influence"), the curvature builds ("curvature",
"gram", "ekfac", "eigen"), refinement ("refine"), statistics passes given a length ("pass").
`ProgressBars` is the one implementation that draws them; the engine and the CLI make one
unless given their own callback. It lives at the base of the stages so that every stage can use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from logix import comm

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)

# phase -> (label, unit counted)
PHASES: dict[str, tuple[str, str]] = {
    "scores": ("scoring", "rows"),
    "top_k": ("top-k", "rows"),
    "self_influence": ("self-influence", "rows"),
    "curvature": ("curvature statistics", "rows"),
    "gram": ("reading rows (Gram form)", "rows"),
    "ekfac": ("EK-FAC eigenvalues", "rows"),
    "eigen": ("eigendecompositions", "blocks"),
    "refine": ("refining queries", "rows"),
    "pass": ("statistics pass", "batches"),
}


class ProgressBars:
    """A `ProgressFn` that draws one transient bar per phase, removed when the phase reaches
    its total; the display stops when no phase is left (or at `close()`).

    console: a rich Console (default: stderr). quiet: draw nothing. Nothing is drawn either when
    the console is not a terminal (a pipe, a file, a test's captured stderr), so logs stay clean.
    """

    def __init__(self, console: Any = None, quiet: bool = False) -> None:
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        # One display per job: under torch.distributed only rank 0 draws.
        self.enabled = not quiet and bool(console.is_terminal) and comm.rank_and_world()[0] == 0
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            self._progress = _new_progress(self.console)
            self._progress.start()
        task = self._tasks.get(phase)
        if task is None:
            label, unit = PHASES.get(phase, (phase.replace("_", " "), "rows"))
            task = self._tasks[phase] = self._progress.add_task(label, total=max(int(total), 1), unit=unit)
        finished = done >= total
        self._progress.update(task, completed=int(done), total=max(int(total), 1), refresh=finished)
        if finished:
            self._progress.remove_task(task)
            del self._tasks[phase]
            if not self._tasks:
                self.close()

    def close(self) -> None:
        """Stop the display (after an error mid-pass, say); the next call starts a new one."""
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._tasks.clear()


@contextlib.contextmanager
def closing(progress: ProgressFn | None) -> Iterator[None]:
    """Run a block, then stop `progress`'s display if it has one (an error mid-pass leaves no
    bar drawn on the terminal)."""
    try:
        yield
    finally:
        close = getattr(progress, "close", None)
        if callable(close):
            close()


def _new_progress(console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            unit = task.fields.get("unit", "rows")
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} {unit}/s", style="progress.data.speed")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        Rate(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
