"""`logix report RUN_DIR --queries FILE -o report.html`: one self-contained HTML page with, per
query, its most helpful and most harmful training examples (`logix.query.report`).

Examples are drawn by a renderer, `--render SPEC` (train ids) and `--render-query SPEC`
(query ids), where SPEC is `path/to/file.py:function` or `package.module:function` and the
function maps an id to `logix.render.Html` (e.g. `logix.render.image(pixels)`), a str or an
image array. Without one, each example is shown by its id.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from logix.commands.engine_options import (
    add_engine_options,
    add_run_dir,
    check_output,
    harmful_top_k,
    load_queries,
    open_engine,
    run_command,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_dir(parser)
    parser.add_argument("--output", "-o", required=True, metavar="FILE", help="the page to write (.html)")
    parser.add_argument(
        "-k", "--top-k", type=int, default=5, metavar="K", help="examples per side (default 5)"
    )
    parser.add_argument(
        "--render", metavar="SPEC", help="FILE.py:FUNCTION or MODULE:FUNCTION drawing a train id"
    )
    parser.add_argument("--render-query", metavar="SPEC", help="the same for query ids")
    parser.add_argument("--title", help="the page's title")
    add_engine_options(parser)


def main(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console()
    return run_command(lambda: _main(args, console), console)


def _main(args: argparse.Namespace, console: Console) -> int:
    from logix.query.report import write_report

    check_output(args.output, (".html", ".htm"))
    if args.top_k < 1:
        raise ValueError(f"-k must be at least 1, got {args.top_k}")
    render = load_function(args.render, "--render") if args.render else None
    render_query = load_function(args.render_query, "--render-query") if args.render_query else None
    queries = load_queries(args.queries)
    engine = open_engine(args, console)
    helpful = engine.top_k(queries, k=args.top_k)
    harmful = harmful_top_k(engine, queries, args.top_k)
    options = {"title": args.title} if args.title else {}
    write_report(args.output, helpful, harmful, render=render, render_query=render_query, **options)
    console.print(
        f"report of {len(helpful.query_ids)} queries written to {escape(str(args.output))}", highlight=False
    )
    return 0


def load_function(spec: str, option: str) -> Any:
    """The function `FILE.py:NAME` or `MODULE:NAME` names (the user's own code, run as given)."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"{option} {spec}: write FILE.py:FUNCTION or MODULE:FUNCTION")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"{option} {spec}: no file {where}")
        module_name = f"logix_renderer_{path.stem}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.path.insert(0, str(path.resolve().parent))  # the file's own imports, as `python FILE` has them
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{option} {spec}: {where} has no function {name!r}")
    return function
