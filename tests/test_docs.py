"""The README's and docs' commands, paths, links and names are real: every shell command names a
script that exists and parses, with options that script defines; `logix` commands parse, and the
README's run as written against a small store; every repository path, test name, relative link,
anchor and `logix.<name>` the pages mention exists. Fast: nothing but the CLI is run."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import shlex
import textwrap
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.cli import build_parser
from logix.cli import main as logix_main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENERATED = ("/out/", "/out`")  # files the examples write (examples/digits/out/...)


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced(text: str, languages: tuple[str, ...]) -> list[str]:
    blocks = re.finditer(r"^( *)```(\w*)\n(.*?)^ *```", text, re.S | re.M)
    return [textwrap.dedent(m.group(3)) for m in blocks if m.group(2) in languages]


def outside_fences(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def shell_commands(text: str) -> list[str]:
    """Commands of ```bash blocks (a line each, comments dropped) and inline `python ...` spans
    (inline `logix ...` spans are mentions, often with placeholders: not commands)."""
    found = []
    for block in fenced(text, ("bash", "sh", "shell")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    for span in re.findall(r"`([^`]+)`", outside_fences(text)):
        span = " ".join(span.split())
        if span.split(" ")[0] in ("bash", "python", "torchrun") and len(span.split(" ")) > 1:
            found.append(span)
    return found


def all_commands() -> list[tuple[str, str]]:
    return [(page_id(p), c) for p in PAGES for c in shell_commands(p.read_text(encoding="utf-8"))]


@cache
def script_options(path: Path) -> frozenset[str]:
    """The `--options` a script's argparse defines (string arguments of `add_argument`), its own
    and those of the scripts beside it that it imports (shared argument helpers)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    options = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (path.parent / f"{node.module}.py").is_file():
            options.update(script_options(path.parent / f"{node.module}.py"))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            names = [
                a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")
            ]
            options.update(names)
            action = next((k.value for k in node.keywords if k.arg == "action"), None)
            if getattr(action, "attr", "") == "BooleanOptionalAction":  # --x also gives --no-x
                options.update(f"--no-{n[2:]}" for n in names if n.startswith("--"))
    return frozenset(options)


def check_python_script(tokens: list[str]) -> None:
    scripts = [t for t in tokens if t.endswith(".py")]
    assert scripts, f"no script in {tokens}"
    path = ROOT / scripts[0]
    assert path.is_file(), f"{scripts[0]} does not exist"
    ast.parse(path.read_text(encoding="utf-8"))  # it parses
    after = tokens[tokens.index(scripts[0]) + 1 :]
    flags = [t.split("=")[0] for t in after if t.startswith("--")]
    unknown = [f for f in flags if f not in script_options(path)]
    assert not unknown, f"{scripts[0]} has no option(s) {unknown}"


def check_logix_command(tokens: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            build_parser().parse_args(tokens[1:])
        except SystemExit as e:  # --help exits 0; a wrong option exits 2
            assert e.code == 0, f"`{' '.join(tokens)}` does not parse: {err.getvalue().strip()}"


@pytest.mark.parametrize(("page", "command"), all_commands(), ids=lambda v: v[:60])
def test_every_documented_command_is_real(page, command):
    tokens = [t for t in shlex.split(command.replace("[", "").replace("]", "")) if t != "..."]
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # environment assignments
        tokens = tokens[1:]
    word = tokens[0]
    if word == "bash":
        assert (ROOT / tokens[1]).is_file(), f"{page}: {tokens[1]} does not exist"
        for arg in tokens[2:]:
            assert (ROOT / arg.split("::")[0]).exists(), f"{page}: {arg} does not exist"
    elif word == "python" and tokens[1] == "-m":
        assert importlib.util.find_spec(tokens[2]) is not None, f"{page}: no module {tokens[2]}"
        if tokens[2] == "logix" and tokens[3:]:  # alone, it names the program
            check_logix_command(["logix", *tokens[3:]])
    elif word in ("python", "torchrun"):
        check_python_script(tokens)
    elif word == "logix":
        check_logix_command(tokens)
    else:
        pytest.fail(f"{page}: teach tests/test_docs.py the command {command!r}")


def test_the_commands_are_found():
    commands = [c for _, c in all_commands()]
    assert any(c.startswith("bash scripts/demo.sh") for c in commands)
    assert any(c.startswith("python examples/digits/lds.py --ranks") for c in commands)
    assert sum(c.startswith("logix ") for c in commands) >= 4


def test_every_repository_path_and_test_named_exists():
    missing = []
    for page in PAGES:
        current = None  # the test file that `::name` spans continue
        for span in re.findall(r"`([^`]+)`", outside_fences(page.read_text(encoding="utf-8"))):
            for path in re.findall(
                r"\b(?:examples|configs|benchmarks|scripts|tests|logix|docs)/[\w./-]*\w", span
            ):
                if not any(g in f"/{path}/" for g in GENERATED) and not (ROOT / path).exists():
                    missing.append(f"{page_id(page)}: {path}")
            for file, name in re.findall(r"(?:^|[\s/])(test_\w+\.py)?::(\w+)", span):
                current = file or current
                source = (ROOT / "tests" / current).read_text(encoding="utf-8") if current else ""
                if not re.search(rf"^def {name}\(", source, re.M):
                    missing.append(f"{page_id(page)}: {current}::{name}")
    assert not missing, missing


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = outside_fences(path.read_text(encoding="utf-8"))
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page_id(page)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page_id(page)}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_fits_on_a_screen_and_links_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def defined_names(module: str) -> set[str]:
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_python_blocks_parse_and_name_real_logix_api():
    problems = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for block in fenced(text, ("python",)):
            try:
                ast.parse(block)
            except SyntaxError as e:
                problems.append(f"{page_id(page)}: a python block does not parse ({e})")
            for module, names in re.findall(r"^from (logix[\w.]*) import ([\w, ]+)$", block, re.M):
                wanted = {n.split(" as ")[0].strip() for n in names.split(",")}
                if module == "logix":
                    missing = {n for n in wanted if not hasattr(logix, n)}
                else:
                    missing = wanted - defined_names(module)
                if missing:
                    problems.append(f"{page_id(page)}: {module} has no {sorted(missing)}")
        for name in set(re.findall(r"\blogix\.([A-Za-z_]\w*)\b", text)):
            is_module = (ROOT / "logix" / name).is_dir() or (ROOT / "logix" / f"{name}.py").is_file()
            if not is_module and not hasattr(logix, name):
                problems.append(f"{page_id(page)}: logix.{name} does not exist")
    assert not problems, problems


def test_the_readmes_cli_commands_run_as_written(tmp_path, monkeypatch):
    """The README's `logix` commands, run as written (from a fresh directory) against a small
    store and query file at the paths they name (the demo's: examples/digits/out/...)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [
        shlex.split(c) for c in shell_commands(readme) if c.startswith("logix ") and "--help" not in c
    ]
    assert commands
    store_dirs = {c[2] for c in commands if c[1] == "inspect"}
    query_files = {c[c.index("--queries") + 1] for c in commands if "--queries" in c}
    assert len(store_dirs) == 1 and len(query_files) <= 1, "the README's commands name one store"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    run_dir = tmp_path / store_dirs.pop()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    with logix.init(run_dir, config={"projection": {"rank_in": 3, "rank_out": 2}}) as run:
        run.watch(model)
        with run(data_id=list(range(12))):
            F.cross_entropy(model(x), y).backward()
    query = logix.init(run_dir, mode="query")
    query.watch(model)
    with query(data_id=["q0", "q1"]):
        F.cross_entropy(model(x[:2]), y[:2]).backward()
    for path in query_files:  # the README says: query.gradients().save(path)
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        query.gradients().save(tmp_path / path)
    for command in commands:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert logix_main(command[1:]) == 0, " ".join(command)
        for flag in set(command) & {"--output", "-o"}:
            assert (tmp_path / command[command.index(flag) + 1]).is_file(), " ".join(command)
