"""Cold reads: `Store.iter_chunks` throughput against a plain sequential read of the same
shard files, both from a cold page cache, measured in one run.

    python benchmarks/bench_cold_read.py               # 2 GiB store, three runs
    python benchmarks/bench_cold_read.py --gib 4 --runs 3 --dir /some/disk

Each measurement starts with the store's files evicted from the page cache: the benchmark
fsyncs them and asks the kernel to drop their pages (`posix_fadvise(POSIX_FADV_DONTNEED)`),
which needs no root and touches no other file; `--drop-all` writes /proc/sys/vm/drop_caches
instead (root only). The plain read is a Python `readinto` loop over every shard file in store
order with 8 MiB buffers, the rate `dd bs=8M` reaches. The two are interleaved (plain first on
odd runs, second on even ones) so that drift in the disk's rate hits both alike.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from page_cache import evict_files, read_files

from logix.store.create import create_store
from logix.store.format import ModuleInfo
from logix.store.reader import TORCH_DTYPES, open_store
from logix.store.writer import StoreWriter


def build_store(run_dir: Path, gib: float, width: int, dtype: str) -> None:
    """A store of about `gib` GiB in `dtype`: one module of row width `width`, random rows."""
    module = ModuleInfo("layer", "Linear", width, 1, width, 1, False, 0)
    config = {"store": {"dtype": dtype}}
    create_store(run_dir, config, f"store:\n  dtype: {dtype}\n", [module], b"", {}, 1)
    rows = int(gib * (1 << 30)) // (TORCH_DTYPES[dtype].itemsize * width)
    batch = torch.randn(1024, width)
    with StoreWriter(run_dir, width=width, dtype=dtype) as writer:
        for start in range(0, rows, 1024):
            k = min(1024, rows - start)
            writer.add(list(range(start, start + k)), batch[:k])


def shard_files(run_dir: Path) -> list[Path]:
    store = open_store(run_dir, verify="none")
    return [run_dir / sh["file"] for sh in store.shards]


def evict(files: list[Path], drop_all: bool) -> None:
    """Drop the files' pages from the page cache (written back first)."""
    evict_files(files)
    if drop_all:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def store_read(run_dir: Path, chunk_rows: int) -> int:
    """Stream every row as float32 with iter_chunks, as the query engine does; returns the bytes
    of the shard files (as the plain read counts them)."""
    store = open_store(run_dir, verify="none")
    for _ in store.iter_chunks(rows=chunk_rows, buffers=2):
        pass
    return store.nbytes


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="store size in GiB")
    parser.add_argument("--width", type=int, default=4096, help="row width D (float32)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(TORCH_DTYPES),
        help="storage dtype (rows are read as float32, as the engine does)",
    )
    parser.add_argument("--chunk-rows", type=int, default=4096, help="rows per iter_chunks chunk")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--drop-all", action="store_true", help="also drop the whole page cache (root)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = Path(tempfile.mkdtemp(prefix="logix-cold-", dir=args.dir))
    try:
        run_dir = base / "store"
        build_store(run_dir, args.gib, args.width, args.dtype)
        files = shard_files(run_dir)
        size = sum(p.stat().st_size for p in files)
        print(
            f"store: {len(files)} shards, {size / (1 << 30):.2f} GiB, width {args.width} "
            f"{args.dtype}, chunks of {args.chunk_rows} rows"
        )
        print(f"{'run':>3}  {'plain MiB/s':>11}  {'store MiB/s':>11}  {'store/plain':>11}")
        ratios = []
        for run in range(1, args.runs + 1):
            rates = {}
            order = ("plain", "store") if run % 2 else ("store", "plain")
            for kind in order:
                evict(files, args.drop_all)
                if kind == "plain":
                    seconds, n = timed(read_files, files)
                else:
                    seconds, n = timed(store_read, run_dir, args.chunk_rows)
                rates[kind] = n / seconds / (1 << 20)
            ratios.append(rates["store"] / rates["plain"])
            print(f"{run:>3}  {rates['plain']:>11.0f}  {rates['store']:>11.0f}  {ratios[-1]:>11.2f}")
        print(f"store/plain: min {min(ratios):.2f}, median {sorted(ratios)[len(ratios) // 2]:.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
