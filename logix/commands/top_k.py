"""`logix top-k RUN_DIR --queries FILE -k K`: the most influential training examples per query
(`--harmful`: the most harmful), as a table and optionally a file (.csv, .json, .safetensors, .npz).

Queries are a gradients file from a query-mode run (`run.gradients().save(FILE)`). The engine's
options default to the store's config (`query:` section), then to logix's defaults.
"""

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
    harmful_top_k,
    load_queries,
    open_engine,
    run_command,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_dir(parser)
    parser.add_argument(
        "--top-k", "-k", type=int, default=10, metavar="K", help="training examples per query (default 10)"
    )
    parser.add_argument(
        "--harmful",
        action="store_true",
        help="the k most harmful (most negative) examples instead, lowest first",
    )
    add_engine_options(parser)
    parser.add_argument("--output", "-o", metavar="FILE", help=f"save the lists as {' / '.join(OUTPUTS)}")
    parser.add_argument(
        "--show",
        type=int,
        default=20,
        metavar="N",
        help="queries shown in the table (default 20; all are saved)",
    )


def main(args: argparse.Namespace, console: Console | None = None) -> int:
    """Print a table of the top-k per query; exit code 2 on any error."""
    console = console or Console()
    return run_command(lambda: _main(args, console), console)


def _main(args: argparse.Namespace, console: Console) -> int:
    check_output(args.output, OUTPUTS)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    queries = load_queries(args.queries)
    engine = open_engine(args, console)
    top = harmful_top_k(engine, queries, args.top_k) if args.harmful else engine.top_k(queries, k=args.top_k)
    if args.output:
        top.save(args.output)
    console.print(table(top, engine, args.show, harmful=args.harmful))
    if len(top.query_ids) > args.show:
        console.print(
            f"… {len(top.query_ids) - args.show} more queries "
            f"({'saved to ' + args.output if args.output else 'use --output to save all'})"
        )
    if args.output:
        console.print(f"saved to {escape(str(args.output))}", highlight=False)
    return 0


def describe(engine) -> str:
    """The preconditioner as the tables name it: `raw`, `ekfac, refine 2, true Fisher`."""
    kind = engine.preconditioner.kind + (f", refine {engine.refine}" if engine.refine else "")
    if engine.fisher == "true" and engine.preconditioner.kind != "identity":
        kind += ", true Fisher"
    return kind


def table(top, engine, show: int, harmful: bool = False) -> Table:
    store = engine.store
    k = top.values.shape[1]
    what = f"the {k} most harmful" if harmful else f"top-{k} influence"
    title = f"{what} ({top.mode}, {describe(engine)})"
    caption = f"segment {store.segment} · {len(store)} train rows · {len(top.query_ids)} queries"
    out = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    out.add_column("query", style="bold")
    out.add_column("rank", justify="right")
    out.add_column("train id")
    out.add_column("score", justify="right")
    for q, ids, values in list(zip(top.query_ids, top.train_ids, top.values.tolist()))[: max(show, 0)]:
        for rank, (tid, score) in enumerate(zip(ids, values), start=1):
            out.add_row(escape(str(q)) if rank == 1 else "", str(rank), escape(str(tid)), f"{score:.4g}")
        out.add_section()
    return out
