"""`logix query RUN_DIR --queries FILE --top-k K`: the most influential training examples.

Queries are a gradients file from a query-mode run (`run.gradients().save(FILE)`). Defaults for
the preconditioner, damping, refine, Fisher and mode come from the store's config (`query:`
section), then from logix's defaults (raw, 0.1, 0, empirical, dot).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from logix.errors import StoreError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a store directory (logix.init path)")
    parser.add_argument(
        "--queries",
        required=True,
        metavar="FILE",
        help="query gradients saved with run.gradients().save(FILE)",
    )
    parser.add_argument(
        "--top-k", type=int, default=10, metavar="K", help="training examples per query (default 10)"
    )
    parser.add_argument("--mode", help="dot | cosine | relative (default: config, else dot)")
    parser.add_argument("--preconditioner", help="identity | raw | kfac | ekfac (default: config, else raw)")
    parser.add_argument(
        "--refine",
        type=int,
        metavar="K",
        help="ekfac only: K passes over the store refining the queries towards "
        "the exact raw solve (default: config, else 0)",
    )
    parser.add_argument(
        "--damping",
        type=float,
        help="damping, relative to each module's mean curvature eigenvalue (default: config, else 0.1)",
    )
    parser.add_argument(
        "--fisher",
        help="empirical | true: the curvature's labels, the data's "
        "or the model's (true needs a run.fit_curvature pass; default: config, "
        "else empirical)",
    )
    parser.add_argument(
        "--absolute-damping",
        action="store_true",
        help="use --damping as an absolute λ instead of a relative one",
    )
    parser.add_argument("--segment", help="store segment to query (default: the last one)")
    parser.add_argument("--modules", help="comma-separated module names (default: all)")
    parser.add_argument(
        "--chunk-bytes",
        type=int,
        metavar="N",
        help="bytes of train rows (as float32) per matrix product (default 64 MiB)",
    )
    parser.add_argument("--chunk-rows", type=int, metavar="N", help=argparse.SUPPRESS)  # old name
    parser.add_argument("--device", help="cpu | cuda | cuda:1 (default: cuda when available)")
    parser.add_argument(
        "--output", "-o", metavar="FILE", help="save the top-k as .json, .safetensors or .npz"
    )
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
    try:
        top, engine = _run(args, console)
    except (StoreError, ValueError, TypeError, OSError, KeyError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    console.print(_table(top, engine, args.show))
    if len(top.query_ids) > args.show:
        console.print(
            f"… {len(top.query_ids) - args.show} more queries "
            f"({'saved to ' + args.output if args.output else 'use --output to save all'})"
        )
    if args.output:
        console.print(f"saved to {escape(str(args.output))}", highlight=False)
    return 0


def _run(args: argparse.Namespace, console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from logix.query.defaults import resolve
    from logix.query.engine import InfluenceEngine
    from logix.store.gradients import Gradients
    from logix.store.reader import open_store

    if args.output and Path(args.output).suffix.lower() not in (".json", ".safetensors", ".npz"):
        raise ValueError(f"--output {args.output}: use a .json, .safetensors or .npz file name")
    if not Path(args.queries).is_file():
        raise ValueError(
            f"queries file {args.queries} does not exist (save one with "
            "run.gradients().save(FILE) from a query-mode run)"
        )
    queries = Gradients.load(args.queries)
    store = open_store(args.run_dir, segment=args.segment)
    # The same defaults as InfluenceEngine(store): the store's `query:` config.
    chosen = resolve(store, args.preconditioner, args.damping, args.refine, args.fisher, args.mode)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = {
                    "curvature": "curvature statistics",
                    "ekfac": "EK-FAC eigenvalues",
                    "refine": "refining queries",
                    "gram": "reading rows (Gram form)",
                    "eigen": "eigendecompositions (blocks)",
                }.get(phase, "scoring")
                tasks[phase] = bar.add_task(label, total=total)
            bar.update(tasks[phase], completed=done)

        chunk = {}  # --chunk-rows N is the old spelling of --chunk-bytes 4·N·width
        if args.chunk_bytes is not None or args.chunk_rows is not None:
            chunk["chunk_bytes"] = (
                args.chunk_bytes if args.chunk_bytes is not None else 4 * args.chunk_rows * store.width
            )
        engine = InfluenceEngine(
            store,
            absolute_damping=args.absolute_damping,
            modules=modules,
            device=args.device,
            progress=progress,
            **chunk,
            **chosen,
        )
        top = engine.top_k(queries, k=args.top_k)
    if args.output:
        top.save(args.output)
    return top, engine


def _table(top, engine, show: int) -> Table:
    store = engine.store
    kind = engine.preconditioner.kind + (f", refine {engine.refine}" if engine.refine else "")
    if engine.fisher == "true" and engine.preconditioner.kind != "identity":
        kind += ", true Fisher"
    title = f"top-{top.values.shape[1]} influence ({top.mode}, {kind})"
    caption = f"segment {store.segment} · {len(store)} train rows · {len(top.query_ids)} queries"
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    table.add_column("query", style="bold")
    table.add_column("rank", justify="right")
    table.add_column("train id")
    table.add_column("score", justify="right")
    for q, ids, values in list(zip(top.query_ids, top.train_ids, top.values.tolist()))[: max(show, 0)]:
        for rank, (tid, score) in enumerate(zip(ids, values), start=1):
            table.add_row(escape(str(q)) if rank == 1 else "", str(rank), escape(str(tid)), f"{score:.4g}")
        table.add_section()
    return table
