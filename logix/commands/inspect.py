"""`logix inspect RUN_DIR [--full]`: summarise a store and check its integrity."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from logix.errors import StoreError
from logix.store.format import PROJECTIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a store directory (logix.init path)")
    parser.add_argument(
        "--full",
        action="store_true",
        help="verify every shard's crc32 and header, repeated ids, the projections "
        "and the curvature files (reads all bytes) instead of sizes only",
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(args: argparse.Namespace, console: Console | None = None) -> int:
    """Print the summary; exit code 2 on any error or integrity failure."""
    from logix.store.reader import open_store

    console = console or Console()
    try:
        with warnings.catch_warnings():  # a rank without an index is reported below instead
            warnings.simplefilter("ignore")
            store = open_store(args.run_dir, verify="none", missing_ranks="warn")
        _summary(console, store)
    except (StoreError, OSError, ValueError, KeyError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2

    from logix.store.integrity import verify_store

    mode = "full (crc32)" if args.full else "quick (existence and size)"
    _unindexed(console, store)
    if not (store.path / PROJECTIONS).is_file():
        console.print(
            "[bold yellow]projections.safetensors is missing[/]: the stored rows are "
            "readable, but no new gradients (queries, resumed logging) can be captured "
            "for this store",
            highlight=False,
            soft_wrap=True,
        )
    try:
        problems = verify_store(store, full=args.full)
    except StoreError as e:
        problems = [str(e)]
    missing = [r for r, state in store.rank_status().items() if state == "no index"]
    if missing:
        problems.append(
            f"rank(s) {missing} are named in the manifest but have no index: their rows are "
            "missing (open_store refuses the store; open_store(path, missing_ranks='warn') "
            "opens the other ranks' rows)"
        )
    if problems:
        console.print(
            f"[bold red]integrity {mode}: FAILED[/] " + " | ".join(problems), highlight=False, soft_wrap=True
        )
        return 2
    shards = sum(len(store.select(n, verify="none").shards) for n in store.segments)
    console.print(f"[bold green]integrity {mode}: ok[/] ({shards} shards)", highlight=False)
    return 0


def _unindexed(console: Console, store) -> None:
    """One line per segment with complete shards that no index lists yet."""
    for name in store.segments:
        found = store.select(name, verify="none").unindexed_shards
        if found:
            rows = sum(sh["rows"] for sh in found)
            console.print(
                f"[bold yellow]segment {name}: {len(found)} complete shard(s) ({rows} rows) are "
                "not indexed yet[/]: a writer stopped between writing a shard and updating its "
                "index (or is doing so now). They are not read; logix.init(run_dir, resume=True) "
                "adopts them, and after run.watch(model) run.logged_ids() includes them.",
                highlight=False,
                soft_wrap=True,
            )
    orphan_segments = {sh["segment"] for sh in store.all_unindexed_shards} - set(store.segments)
    for name in sorted(orphan_segments):
        console.print(
            f"[bold yellow]segment {name}: only in shards that no index lists[/] "
            "(a deleted or lost index?); logix.init(run_dir, resume=True) adopts them",
            highlight=False,
            soft_wrap=True,
        )


def _summary(console: Console, store) -> None:
    m = store.manifest
    console.print(f"[bold]logix store[/] {store.path}", highlight=False)
    console.print(
        f"format {m.get('format')} v{m.get('version')}  dtype {store.dtype}  D = {store.width}  "
        f"ranks {store.ranks or '-'}  logix {m.get('logix_version', '?')}  "
        f"created {m.get('created', '?')}",
        highlight=False,
    )
    seg_table = Table(title="segments", title_justify="left")
    for col in ("segment", "rows", "shards", "size", "meta", "curvature files"):
        seg_table.add_column(col, justify="right" if col in ("rows", "shards", "size") else "left")
    total_shards = shard_bytes = 0
    for name in store.segments:
        view = store.select(name, verify="none")
        total_shards += len(view.shards)
        shard_bytes += view.nbytes
        cdir = view.curvature_dir
        files = sorted(p.name for p in cdir.iterdir() if p.is_file()) if cdir.is_dir() else []
        seg_table.add_row(
            name,
            str(len(view)),
            str(len(view.shards)),
            _size(view.nbytes),
            json.dumps(view.segment_meta) if view.segment_meta else "",
            ", ".join(files) or "-",
        )
    if store.segments:
        console.print(seg_table)
    else:
        console.print("no segments: no rows have been logged yet")
    console.print(
        f"shards {total_shards}  ({_size(shard_bytes)}); on disk in total {_size(_dir_bytes(store.path))}",
        highlight=False,
    )

    _ranks(console, store)

    mod_table = Table(title="modules", title_justify="left")
    for col in ("name", "type", "d_in", "d_out", "r_in", "r_out", "bias", "columns"):
        mod_table.add_column(col, justify="left" if col in ("name", "type") else "right", overflow="fold")
    for mod in store.modules:
        cols = mod.columns
        mod_table.add_row(
            mod.name,
            mod.type,
            str(mod.d_in),
            str(mod.d_out),
            str(mod.r_in),
            str(mod.r_out),
            "yes" if mod.bias else "no",
            f"{cols.start}:{cols.stop}",
        )
    console.print(mod_table)

    proj = m.get("projection") or {}
    details = ", ".join(f"{k} {v}" for k, v in proj.items() if k not in ("kind", "notes"))
    console.print(
        f"projection {proj.get('kind', '?')}" + (f" ({details})" if details else ""), highlight=False
    )
    for note in proj.get("notes", []):
        console.print(f"  note: {note}", highlight=False)


def _ranks(console: Console, store) -> None:
    """One line per rank whose logging did not finish: its rows after the last completed
    shard are missing (`store.missing_ids(expected)` names them)."""
    status = store.rank_status()
    unfinished = {r: s for r, s in status.items() if s != "finalized"}
    if not unfinished:
        if len(status) > 1:
            console.print(f"ranks {sorted(status)}: all finalized", highlight=False)
        return
    for rank, state in unfinished.items():
        rows = store.rows_by_rank().get(rank, 0)
        console.print(
            f"[bold yellow]rank {rank}: {state}[/] ({rows} rows in completed shards): its logging "
            "stopped before run.finalize() (or is still running); rows it had not yet written "
            "are missing. store.missing_ids(expected_ids) lists them; log them again with "
            "logix.init(..., resume=True).",
            highlight=False,
            soft_wrap=True,
        )
