"""`logix scores RUN_DIR --queries FILE -o FILE`: the full score matrix, one row per query and
one column per training example, saved as .csv, .json, .safetensors or .npz.

A .safetensors file is written a few matrix rows at a time (`InfluenceEngine.save_scores`),
so the matrix is never whole in memory; the other formats hold it in memory first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from logix.commands.engine_options import (
    OUTPUTS,
    add_engine_options,
    add_run_dir,
    check_output,
    load_queries,
    open_engine,
    run_command,
)
from logix.commands.top_k import describe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_dir(parser)
    parser.add_argument(
        "--output", "-o", required=True, metavar="FILE", help=f"where the matrix goes: {' / '.join(OUTPUTS)}"
    )
    parser.add_argument(
        "--per-module", action="store_true", help="one matrix per module ([n_modules, n_query, n_train])"
    )
    add_engine_options(parser)


def main(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console()
    return run_command(lambda: _main(args, console), console)


def _main(args: argparse.Namespace, console: Console) -> int:
    check_output(args.output, OUTPUTS)
    queries = load_queries(args.queries)
    engine = open_engine(args, console)
    if Path(args.output).suffix.lower() == ".safetensors":
        engine.save_scores(queries, args.output, per_module=args.per_module)
    else:
        engine.scores(queries, per_module=args.per_module).save(args.output)
    shape = [len(queries), len(engine.store)]
    if args.per_module:
        shape.insert(0, len(engine.preconditioner.selected))
    console.print(
        f"scores {shape} ({engine.mode}, {describe(engine)}; segment {engine.store.segment}) "
        f"saved to {escape(str(args.output))}",
        highlight=False,
    )
    return 0
