"""A real headless browser for the HTML report tests: Debian's Chromium, skipped when absent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium() -> str:
    """The browser's path, or skip the test (`.ci/run` installs it: apt-get install chromium)."""
    found = os.environ.get("LOGIX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    return found


@dataclass
class Page:
    dom: str  # the document after load, as the browser serialises it
    console: list[str]  # console messages and uncaught errors the page produced
    screenshot: Path  # PNG of the window


def load(page: Path, work: Path, size: tuple[int, int] = (1400, 1000)) -> Page:
    """Open `page` (a file) in a fresh profile: its DOM, console messages and a screenshot."""
    browser = chromium()
    work.mkdir(parents=True, exist_ok=True)
    url = page.resolve().as_uri()
    console, dom = [], ""
    shot = work / "screenshot.png"
    for i, action in enumerate(["--dump-dom", f"--screenshot={shot}"]):
        cmd = [
            browser,
            *FLAGS,
            f"--user-data-dir={work / f'profile-{i}'}",
            f"--window-size={size[0]},{size[1]}",
        ]
        done = subprocess.run([*cmd, action, url], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        console += [line for line in done.stderr.splitlines() if re.search(r":CONSOLE(\(\d+\))?:", line)]
        if action == "--dump-dom":
            dom = done.stdout
    assert shot.is_file(), "the browser wrote no screenshot"
    return Page(dom, console, shot)


def colour_count(png: Path, rgb: tuple[int, int, int]) -> int:
    """Pixels of exactly `rgb` in a screenshot."""
    image = pytest.importorskip("PIL.Image")
    import numpy as np

    a = np.asarray(image.open(png).convert("RGB"))
    return int((a == np.asarray(rgb, dtype=a.dtype)).all(-1).sum())
