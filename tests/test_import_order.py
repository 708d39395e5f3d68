"""The stages import downward only (DESIGN §4), function-local imports included, and no module
imports itself back through a cycle. Walks every module of the package with `ast`."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "logix"

# Lower numbers are lower stages; a module may import its own stage or any lower one.
STAGES = {
    "logix.errors": 0,
    "logix.vocabulary": 0,
    "logix.config": 0,
    "logix.comm": 0,
    "logix.version": 0,
    "logix.progress": 0,
    "logix.notices": 0,
    "logix.store": 1,
    "logix.capture": 2,
    "logix.curvature": 3,
    "logix.query": 4,
    "logix.measurements": 4,
    "logix.losses": 4,
    "logix.run": 5,
    "logix.unroll": 6,
    "logix.integrations": 6,
    "logix.commands": 6,
    "logix.cli": 6,
    "logix.__main__": 6,
    "logix.eval": 6,
    "logix.data": 6,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stage(name: str) -> int | None:
    """The stage of a logix module: that of its longest listed prefix."""
    best = None
    for prefix, level in STAGES.items():
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, level)
    return None if best is None else best[1]


def imports(path: Path) -> set[str]:
    """Every logix module `path` imports, at any depth of the file (TYPE_CHECKING included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("logix"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("logix"):
                continue
            for alias in node.names:  # `from logix.x import y` may import the module x.y
                sub = f"{target}.{alias.name}"
                found.add(sub if _is_module(sub) else target)
    found.discard(here)
    return found


@cache
def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel.with_suffix(".py")).exists() or (
        PACKAGE.parent / rel / "__init__.py"
    ).exists()


@cache
def all_modules() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_stage():
    unknown = [m for m in all_modules() if m != "logix" and stage(m) is None]
    assert not unknown, f"add these modules to STAGES (or move them): {unknown}"


def test_no_upward_import():
    upward = []
    for name, deps in all_modules().items():
        if name == "logix":  # the public face may import every stage
            continue
        for dep in deps:
            if dep == "logix" and name != "logix":
                upward.append(f"{name} imports the package root")
            elif None not in (stage(dep), stage(name)) and stage(dep) > stage(name):
                upward.append(f"{name} (stage {stage(name)}) imports {dep} (stage {stage(dep)})")
    assert not upward, "imports against the stage order:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    modules = all_modules()
    graph = {n: {d for d in deps if d in modules} for n, deps in modules.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(trail[trail.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from logix.query.engine import x\n", "logix.query.engine"),
        ("def f():\n    from logix.run import y\n", "logix.run"),
    ],
)
def test_walker_sees_top_level_and_local_imports(tmp_path, source, expected):
    path = PACKAGE / "store" / "_probe_for_test.py"
    try:
        path.write_text(source)
        assert expected in imports(path)
    finally:
        path.unlink()


def test_public_types_are_exported():
    """The error, result and gradient types users catch or receive come from `logix` itself."""
    import logix
    from logix.query.rerank import Rerank
    from logix.query.results import Scores, SelfInfluence, TopK
    from logix.query.tokens import TokenScores
    from logix.run.block import Block
    from logix.run.passes import StatisticsPass

    for cls in (Scores, TopK, SelfInfluence, TokenScores, Rerank, Block, StatisticsPass):
        assert getattr(logix, cls.__name__) is cls
    for name in ("LogixError", "ConfigError", "StoreError", "CaptureError", "ChoiceError"):
        assert issubclass(getattr(logix, name), logix.LogixError)
    assert set(logix.__all__) >= {"Gradients", "TokenGradients", "Scores", "TopK", "SelfInfluence"}
