"""Warnings logix gives, attributed to the user's line rather than to logix's own.

A warning raised inside a capture hook would otherwise point at `logix/capture/hooks.py` (or at
torch's module call), which tells the user nothing. `warn` walks the stack to the first frame
that is neither logix's nor torch's (nor `contextlib`'s, which runs `with` blocks of generator
context managers) and gives Python's `warnings` the stack level of that frame, so the printed
location, `-W error` and warning filters by module all refer to the user's code. Every warning
logix gives goes through here (`tests/test_notices.py` checks that no other module calls
`warnings.warn`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

_LOGIX_DIR = str(Path(__file__).resolve().parent) + os.sep
_CONTEXTLIB = os.path.normcase(os.path.abspath(contextlib.__file__))


def _torch_dir() -> str | None:
    torch = sys.modules.get("torch")
    path = getattr(torch, "__file__", None)
    return None if path is None else str(Path(path).resolve().parent) + os.sep


def _is_import_machinery(filename: str) -> bool:
    """The frames Python's `warnings` itself skips when it counts a stack level."""
    return "importlib" in filename and "_bootstrap" in filename


def _is_library(filename: str, torch_dir: str | None) -> bool:
    if filename.startswith("<"):
        return _is_import_machinery(filename)
    path = os.path.normcase(os.path.abspath(filename))
    resolved = str(Path(filename).resolve())
    if resolved.startswith(_LOGIX_DIR) or path == _CONTEXTLIB:
        return True
    return torch_dir is not None and resolved.startswith(torch_dir)


def user_stacklevel() -> int:
    """The `stacklevel` that this function's caller passes to `warnings.warn` to name the first
    frame outside logix, torch and contextlib (the outermost frame when there is none, e.g. at
    interpreter exit)."""
    torch_dir = _torch_dir()
    frame = sys._getframe(1)  # the frame that calls warnings.warn
    level = 1  # stacklevel=1 names that frame itself
    best = level
    frame = frame.f_back
    while frame is not None:
        filename = frame.f_code.co_filename
        if _is_import_machinery(filename):  # not counted by warnings either
            frame = frame.f_back
            continue
        level += 1
        best = level
        if not _is_library(filename, torch_dir):
            return level
        frame = frame.f_back
    return best


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` at the user's call site (see the module docstring)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
