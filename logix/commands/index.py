"""`logix index RUN_DIR [--build | --info]`: the approximate index of a store (`logix.build_index`).

--info (the default) says whether the segment has an index of the metric, what it is and
whether it is current (built from the store's present shards), stale or damaged; --build builds
it in one streaming pass (progress on stderr) and saves it in the run directory.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from logix.errors import StoreError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a store directory (logix.init path)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--build", action="store_true", help="build (or rebuild) the index and save it")
    what.add_argument("--info", action="store_true", help="describe the saved index (the default)")
    parser.add_argument(
        "--metric",
        default="cosine",
        help="cosine (serves cosine and relative queries; default) | dot (serves dot queries)",
    )
    parser.add_argument("--segment", help="store segment (default: the last one)")
    parser.add_argument("--nlist", type=int, metavar="N", help="k-means cells (default about 4·√rows)")
    parser.add_argument(
        "--nprobe",
        type=int,
        metavar="N",
        help="cells a query scans by default (default: the fewest that reach --recall on sampled rows)",
    )
    parser.add_argument(
        "--recall",
        type=float,
        default=0.95,
        help="the recall@100 of sampled rows' exact neighbours that picks nprobe (default 0.95)",
    )
    parser.add_argument("--sample-rows", type=int, metavar="N", help="rows the cells are trained on")


def main(args: argparse.Namespace, console: Console | None = None) -> int:
    """Build or describe the index; exit code 2 on any error (1: --info found no usable index)."""
    console = console or Console()
    try:
        from logix.store.reader import open_store

        store = open_store(args.run_dir, segment=args.segment)
        if args.build:
            return _build(args, store, console)
        return _info(args, store, console)
    except (StoreError, ValueError, TypeError, OSError, ImportError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2


def _build(args: argparse.Namespace, store, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from logix.query.index_build import build_index

    labels = {
        "sample": "reading the sample",
        "train": "training cells",
        "index": "adding rows",
        "save": "saving",
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(labels.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done)

        index = build_index(
            store,
            args.metric,
            nlist=args.nlist,
            nprobe=args.nprobe,
            recall=args.recall,
            sample_rows=args.sample_rows,
            progress=progress,
        )
    r = index.record
    console.print(
        f"built the {r['metric']} index of {escape(str(store.path))}, segment {store.segment!r}: "
        f"{r['rows']} rows, {r['nlist']} cells, nprobe {r['nprobe']} ({_calibration(r)}), "
        f"{r['seconds']:.1f} s"
        + (f", {r['bytes'] / 2**20:.1f} MiB in {r['file']}" if "file" in r else " (kept in memory only)"),
        highlight=False,
    )
    return 0


def _info(args: argparse.Namespace, store, console: Console) -> int:
    from logix.query.index import open_index
    from logix.store.ann import read_record

    record = read_record(store.path, store.segment, args.metric)
    if record is None:
        console.print(
            f"{escape(str(store.path))}, segment {store.segment!r}: no {args.metric} index "
            f"(build one with `logix index {escape(str(store.path))} --build`)",
            highlight=False,
        )
        return 1
    try:
        open_index(store, args.metric)
        state = "current"
    except StoreError as e:
        state = f"[bold red]not usable:[/] {escape(str(e))}"
    console.print(
        f"{args.metric} index of {escape(str(store.path))}, segment {store.segment!r}: ivf-flat, "
        f"{record.get('rows')} rows × {record.get('width')}, {record.get('nlist')} cells, nprobe "
        f"{record.get('nprobe')} ({_calibration(record)}), "
        f"{int(record.get('bytes', 0)) / 2**20:.1f} MiB, built "
        f"{record.get('built')} in {record.get('seconds')} s\n{state}",
        highlight=False,
        soft_wrap=True,
    )
    return 0 if state == "current" else 1


def _calibration(record: dict) -> str:
    c = record.get("calibration") or {}
    return (
        f"recall@{c.get('k')} {c.get('recall')}, {c.get('recall_lower')} less two standard errors, "
        f"on {c.get('queries')} sampled rows"
    )
