"""A newcomer's first hour as a test: a fresh checkout (the repository's files, nothing built) →
the digits demo → every `logix ...` command it prints, run as printed → `logix report` → the
page in a real headless browser (skipped without Chromium)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from browser_helpers import chromium, colour_count, load

ROOT = Path(__file__).resolve().parents[1]


def fresh_checkout(to: Path) -> Path:
    """The files git knows (tracked, and new ones not ignored): what a clone would hold."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        src = ROOT / name.decode()
        if src.is_file():
            (to / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, to / name.decode())
    return to


def documented(page: Path) -> list[str]:
    """The `logix ...` lines of a page's bash blocks, continuations joined, comments dropped."""
    commands = []
    for block in page.read_text().split("```bash")[1:]:
        text = block.split("```")[0].replace("\\\n", " ")
        commands += [line.split("  #")[0].strip() for line in text.splitlines() if line.startswith("logix ")]
    return commands


@pytest.mark.slow
def test_fresh_checkout_demo_commands_report(tmp_path):
    chromium()  # skip early, before minutes of work, when there is no browser
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    repo = fresh_checkout(tmp_path / "logix")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    demo = subprocess.run(
        [sys.executable, "examples/digits/demo.py", "--epochs", "1", "--queries", "3", "--k", "3"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = repo / "examples/digits/out"
    assert (out / "report.html").is_file() and (out / "queries.safetensors").is_file()
    printed = demo.stdout.split("ask more from a shell")[-1].splitlines()[1:]
    commands = [line.strip() for line in printed if line.strip().startswith("logix ")]
    names = [c.split()[1] for c in commands]
    assert names[0] == "inspect" and {"top-k", "self-influence", "report"} <= set(names), demo.stdout[-2000:]
    assert {"scores", "report"} <= {c.split()[1] for c in documented(repo / "docs/cli.md")}
    commands += documented(repo / "docs/cli.md")  # and docs/cli.md's, as written
    # Every command as printed, in one interpreter (one torch import, not one per command).
    runner = (
        "import shlex, sys\n"
        "from logix.cli import main\n"
        "for line in sys.argv[1:]:\n"
        "    print('>>>', line, flush=True)\n"
        "    code = main(shlex.split(line)[1:])\n"
        "    if code:\n"
        "        sys.exit(f'{line}: exit code {code}')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", runner, *commands],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(">>> logix ") == len(commands) and "error:" not in done.stdout + done.stderr
    page = out / "report-cli.html"
    assert page.is_file()
    html = page.read_text()
    assert html.count('class="card helpful"') == 15 and html.count('class="card harmful"') == 15  # -k 5
    got = load(page, tmp_path / "browser", size=(1400, 1600))
    assert got.console == []
    assert got.dom.count("data:image/png;base64,") == 3 * (1 + 5 + 5)  # queries and examples drawn
    assert colour_count(got.screenshot, (0, 0, 0)) > 3000  # dark ink of the digits on screen
