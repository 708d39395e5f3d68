"""How close the query engine gets to this machine's limits (DESIGN §3's figure of merit).

- compute-bound (many queries, store in page cache): GFLOP/s of `InfluenceEngine.top_k` (`raw`
  and `identity`) against `torch.matmul` on the same shapes, with the train chunks already in
  memory (target ≥ 0.7); the three calls take turns, --repeats times, and each figure is the
  median [min–max] over the turns (ratios per turn);
- I/O-bound (one query, store read cold from disk): rows read per second by `top_k` against a
  dd-style sequential read of the same shard files (target ≥ 0.7).

The page cache is dropped with /proc/sys/vm/drop_caches when allowed, else per file with
posix_fadvise(DONTNEED) (the files are fsynced first, so their pages are clean and droppable).

    python benchmarks/bench_query.py [--rows 32768 --width 2048 --queries 256 --chunk-mb 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from page_cache import evict_files, read_files
from rich.console import Console
from rich.table import Table

from logix.curvature.covariance import CurvatureStatistics
from logix.query.engine import InfluenceEngine
from logix.store.create import create_store
from logix.store.format import ModuleInfo
from logix.store.gradients import Gradients
from logix.store.reader import open_store
from logix.store.writer import StoreWriter


def build(run: Path, rows: int, width: int, dtype: str, shard_rows: int) -> None:
    """A synthetic store: blocks of 32×32 (w = 1024) per module, with logged raw statistics."""
    block = min(1024, width)
    modules = [
        ModuleInfo(f"m{i}", "Linear", 32, 32, 32, block // 32, False, off)
        for i, off in enumerate(range(0, width, block))
    ]
    create_store(run, {"store": {"dtype": dtype}}, f"store:\n  dtype: {dtype}\n", modules, b"", {}, 1)
    stats = CurvatureStatistics(run, modules)
    gen = torch.Generator().manual_seed(0)
    with StoreWriter(run, width=width, dtype=dtype, shard_rows=shard_rows, observers=[stats]) as w:
        w.start_segment("0")
        for start in range(0, rows, shard_rows):
            n = min(shard_rows, rows - start)
            w.add(list(range(start, start + n)), torch.randn(n, width, generator=gen))
    stats.save()


def drop_cache(files: list[Path]) -> str:
    """Evict `files` from the page cache; returns the method that was used."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        evict_files(files)
        return "posix_fadvise(DONTNEED)"


def sequential_read(files: list[Path]) -> float:
    """Seconds to read `files` front to back in 8 MiB blocks (what `dd bs=8M` does)."""
    t = time.perf_counter()
    read_files(files)
    return time.perf_counter() - t


def interleaved(calls: dict, repeats: int) -> dict[str, list[float]]:
    """`repeats` times of each call, the calls taking turns (turn i is entry i of each list)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def spread(values: list[float], digits: int = 2) -> str:
    """median [min–max]."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--queries", type=int, default=256, help="queries of the compute-bound case")
    p.add_argument("--chunk-mb", type=int, default=64, help="MiB per float32 chunk of train rows")
    p.add_argument("--shard-rows", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="where to build the store (default: a temporary directory)")
    args = p.parse_args()
    console = Console(width=130)

    root = Path(args.dir or tempfile.mkdtemp(prefix="logix-bench-"))
    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    try:
        t = time.perf_counter()
        build(run, args.rows, args.width, args.dtype, args.shard_rows)
        store = open_store(run)
        files = [run / sh["file"] for sh in store.shards]
        console.print(
            f"store: {len(store)} rows × {store.width} ({args.dtype}), "
            f"{store.nbytes / 1e6:.0f} MB in {len(files)} shards, built in "
            f"{time.perf_counter() - t:.1f}s; threads: {torch.get_num_threads()}"
        )
        engine = InfluenceEngine(store, "raw", 0.1, chunk_bytes=args.chunk_mb << 20, device="cpu")

        # Compute-bound: many queries, rows in the page cache.
        q = Gradients(
            torch.randn(args.queries, store.width),
            list(range(args.queries)),
            store.modules,
            store.fingerprint,
        )
        identity = InfluenceEngine(store, "identity", chunk_bytes=args.chunk_mb << 20, device="cpu")
        engine.top_k(q, k=10)  # warm the page cache and the code paths
        identity.top_k(q, k=10)
        chunks = [x for _, x in store.iter_chunks(rows=engine.chunk_rows)]
        qp = torch.randn(args.queries, store.width)
        times = interleaved(
            {
                "raw": lambda: engine.top_k(q, k=10),
                "identity": lambda: identity.top_k(q, k=10),
                "matmul": lambda: [torch.matmul(qp, x.T) for x in chunks],
            },
            args.repeats,
        )
        chunks.clear()
        flop = 2.0 * args.queries * len(store) * store.width
        gflops = {name: [flop / t / 1e9 for t in ts] for name, ts in times.items()}

        # I/O-bound: one query, cold reads.
        q1 = q.select([0])
        method = drop_cache(files)
        t_cold = time.perf_counter()
        engine.top_k(q1, k=10)
        t_cold = time.perf_counter() - t_cold
        drop_cache(files)
        t_dd = sequential_read(files)
        mb_engine, mb_dd = store.nbytes / t_cold / 1e6, store.nbytes / t_dd / 1e6

        table = Table(title="logix query engine vs this machine's limits", title_justify="left")
        for col in ("case", "engine", "limit", "ratio", "target"):
            table.add_column(col, justify="left" if col == "case" else "right")
        for name in ("raw", "identity"):
            table.add_row(
                f"compute: top-10, {args.queries} queries, {name} (GFLOP/s)",
                spread(gflops[name], 1),
                f"{spread(gflops['matmul'], 1)} (matmul)",
                spread([m / e for e, m in zip(times[name], times["matmul"])]),
                "≥ 0.70",
            )
        table.add_row(
            f"cold read: top-10, 1 query (MB/s, {method})",
            f"{mb_engine:.0f}",
            f"{mb_dd:.0f} (sequential read)",
            f"{mb_engine / mb_dd:.2f}",
            "≥ 0.70",
        )
        console.print(table)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
