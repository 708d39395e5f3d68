"""`logix self-influence RUN_DIR`: I(z, z) of every training example (outlier and mislabel
candidates have the highest), the top shown as a table, all of them saved with -o FILE."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from logix.commands.engine_options import (
    OUTPUTS,
    add_engine_options,
    add_run_dir,
    check_output,
    open_engine,
    run_command,
)
from logix.commands.top_k import describe
from logix.vocabulary import SELF_INFLUENCE_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_dir(parser, queries=False)
    parser.add_argument(
        "--top", type=int, default=10, metavar="N", help="examples shown, highest first (default 10)"
    )
    parser.add_argument("--per-module", action="store_true", help="one value per module as well")
    parser.add_argument("--output", "-o", metavar="FILE", help=f"save every value as {' / '.join(OUTPUTS)}")
    add_engine_options(parser, modes=SELF_INFLUENCE_MODES)


def main(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console()
    return run_command(lambda: _main(args, console), console)


def _main(args: argparse.Namespace, console: Console) -> int:
    check_output(args.output, OUTPUTS)
    mode = args.mode or "dot"
    engine = open_engine(args, console)
    result = engine.self_influence(mode=mode, per_module=args.per_module)
    if args.output:
        result.save(args.output)
    table = Table(
        title=f"highest self-influence ({mode}, {describe(engine)})",
        caption=f"segment {engine.store.segment} · {len(engine.store)} train rows",
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("rank", justify="right")
    table.add_column("train id")
    table.add_column("self-influence", justify="right")
    for rank, (tid, value) in enumerate(result.top(max(args.top, 0)), start=1):
        table.add_row(str(rank), escape(str(tid)), f"{value:.4g}")
    console.print(table)
    if args.output:
        console.print(f"saved to {escape(str(args.output))}", highlight=False)
    return 0
