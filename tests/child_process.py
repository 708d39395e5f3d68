"""The one way the tests start a Python child process: with this checkout first on its path.

A child imports `logix` from the checkout the tests run from (and the helpers in tests/), never
from an installed copy: the suite passes from a plain checkout (no `pip install`), and from a
worktree next to an editable install of another one it tests this checkout's code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CHECKOUT = TESTS.parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this one, PYTHONPATH = checkout, tests/, then any given
    before, plus `extra` variables."""
    before = os.environ.get("PYTHONPATH", "")
    path = os.pathsep.join(p for p in (str(CHECKOUT), str(TESTS), before) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def python_command(*args: str) -> list[str]:
    """`python ARGS` with the interpreter running the tests."""
    return [sys.executable, *map(str, args)]


def run_python(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """Run `python ARGS` (e.g. "-c", script, argv...) to completion in tests/, output captured;
    `env` adds variables to `child_env()`."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("cwd", TESTS)
    return subprocess.run(python_command(*args), env=child_env(**(env or {})), timeout=timeout, **kwargs)


def start_python(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start `python ARGS` in tests/ and return the process (to signal or wait for it)."""
    kwargs.setdefault("cwd", TESTS)
    return subprocess.Popen(python_command(*args), env=child_env(**(env or {})), **kwargs)
