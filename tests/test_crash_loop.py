"""The crash loop (scripts/crash_loop.py) with a few kills: SIGKILL at random moments, resume
with the README's recipe, every id exactly once, rows equal to a clean run."""

from __future__ import annotations

from pathlib import Path

import pytest
from child_process import run_python

SCRIPT = Path(__file__).parent.parent / "scripts" / "crash_loop.py"


@pytest.mark.slow
def test_crash_loop_with_a_few_kills():
    proc = run_python(
        SCRIPT,
        "--kills",
        "4",
        "--ids",
        "1200",
        "--max-delay",
        "0.8",
        "--seed",
        "1",
        env={"OMP_NUM_THREADS": "1"},
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kills: every id stored exactly once, rows equal to a clean run" in proc.stdout


@pytest.mark.slow
def test_crash_loop_of_a_run_that_records_its_trajectory_and_fits_kfac():
    """Kills while logging, inside finalize() and in the statistics pass; the README recipe
    resumes each; store, trajectory, replay and raw/kfac/ekfac scores equal a clean run's."""
    args = ["--trajectory", "--kills", "1", "--steps", "24", "--batch", "4", "--shard-rows", "8"]
    proc = run_python(
        SCRIPT,
        *args,
        "--max-delay",
        "1.0",
        "--seed",
        "2",
        env={"OMP_NUM_THREADS": "1"},
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kills (logging, finalize, statistics pass)" in proc.stdout
    assert "equal to a clean run" in proc.stdout
