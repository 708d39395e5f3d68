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
