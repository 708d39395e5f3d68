"""The approximate index against the exact scan: recall@k and query time on a synthetic store.

The store (default 1M rows × 256 float32, 1 GB) is written through the store's own writer in
one streaming pass of clustered rows: 2000 random centres, each row a centre plus anisotropic
noise of the same norm (spectrum ∝ 1/√i, so a row's cosine to its centre is about 0.7), scaled
by a random norm in [0.3, 3]. Queries are fresh rows of the same distribution (not in the
store). The index is built as `logix index RUN --build` builds it (defaults: nlist ≈ 4·√N,
trained on a sample of 64·nlist rows). Both sides use `InfluenceEngine.top_k` with the identity
preconditioner and cosine mode, on the CPU, rows in the page cache (the exact scan's best case);
times are medians of interleaved repeats, recall@k against the exact top k of each query.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_index.py   # ~12 min on 2 loaded cores, mostly k-means
    PYTHONPATH=. .venv/bin/python benchmarks/bench_index.py --rows 100000 --repeats 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from logix.query.engine import InfluenceEngine
from logix.query.index import open_index
from logix.query.index_build import build_index
from logix.store.create import create_store
from logix.store.format import ModuleInfo
from logix.store.gradients import Gradients
from logix.store.reader import open_store
from logix.store.writer import StoreWriter

CENTRES = 2000


class Rows:
    """The synthetic distribution: clustered, anisotropic, with spread norms (see the doc)."""

    def __init__(self, width: int, noise: float = 1.0, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(CENTRES, width, generator=gen)
        spectrum = 1.0 / torch.arange(1, width + 1, dtype=torch.float32).sqrt()
        self.scale = noise * spectrum * (width / spectrum.square().sum()).sqrt()  # ‖noise‖ ≈ noise·‖centre‖
        self.basis = torch.linalg.qr(torch.randn(width, width, generator=gen))[0]

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        which = torch.randint(0, CENTRES, (n,), generator=gen)
        noise = (torch.randn(n, self.centres.shape[1], generator=gen) * self.scale) @ self.basis.T
        norms = 0.3 + 2.7 * torch.rand(n, 1, generator=gen)
        return (self.centres[which] + noise) * norms


def build_store(run: Path, rows: int, width: int, shard_rows: int, dist: Rows) -> None:
    block = 32 * 32
    modules = [
        ModuleInfo(f"m{i}", "Linear", 32, 32, 32, min(block, width - off) // 32, False, off)
        for i, off in enumerate(range(0, width, block))
    ]
    create_store(run, {"store": {"dtype": "float32"}}, "store:\n  dtype: float32\n", modules, b"", {}, 1)
    gen = torch.Generator().manual_seed(1)
    with StoreWriter(run, width=width, dtype="float32", shard_rows=shard_rows) as w:
        w.start_segment("0")
        for start in range(0, rows, shard_rows):
            n = min(shard_rows, rows - start)
            w.add(list(range(start, start + n)), dist.draw(n, gen))


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)]
    return sum(hits) / exact.numel()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--shard-rows", type=int, default=16384)
    p.add_argument(
        "--nprobe", type=int, nargs="+", help="cells scanned per query (default: nlist/64 … nlist/8)"
    )
    p.add_argument("--noise", type=float, default=1.0, help="noise norm / centre norm (default 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where to build the store (default: a temporary directory; kept if given)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    console = Console(width=130)
    root = Path(args.dir or tempfile.mkdtemp(prefix="logix-bench-index-"))
    run = root / f"run-{args.rows}x{args.width}-n{args.noise}"
    dist = Rows(args.width, args.noise)
    try:
        if not (run / "manifest.json").exists():
            shutil.rmtree(run, ignore_errors=True)
            t, _ = timed(lambda: build_store(run, args.rows, args.width, args.shard_rows, dist))
            console.print(f"store written in {t:.0f} s")
        store = open_store(run)
        console.print(
            f"store: {len(store)} rows × {store.width} float32, {store.nbytes / 1e9:.2f} GB, "
            f"{len(store.shards)} shards; torch threads {torch.get_num_threads()}"
        )
        t_build, index = timed(lambda: build_index(store))
        r = index.record
        c = r["calibration"]
        console.print(
            f"index built in {t_build:.0f} s: {r['nlist']} cells trained on {r['sample_rows']} rows, "
            f"{r['bytes'] / 1e9:.2f} GB file; calibrated nprobe {c['nprobe']} (recall@{c['k']} "
            f"{c['recall']} on {c['queries']} sampled rows)"
        )
        t_open, _ = timed(lambda: open_index(store))
        gen = torch.Generator().manual_seed(2)
        q = Gradients(
            dist.draw(args.queries, gen), list(range(args.queries)), store.modules, store.fingerprint
        )
        exact = InfluenceEngine(store, preconditioner="identity", mode="cosine", device="cpu")
        nlist = index.nlist
        calibrated = index.nprobe  # the build's choice for recall 0.95 on sampled rows
        probes = sorted(
            set(args.nprobe or {min(nlist, calibrated * f) for f in (2, 4, 8)} | {max(1, nlist // 64)})
            | {calibrated}
        )
        engines = {
            n: InfluenceEngine(
                store,
                preconditioner="identity",
                mode="cosine",
                device="cpu",
                index=open_index(store, nprobe=n),
            )
            for n in probes
        }
        truth = exact.top_k(q, k=args.k)  # also warms the page cache
        times: dict = {"exact": []}
        found = {}
        for _ in range(args.repeats):  # interleaved: exact, then each nprobe
            t, _ = timed(lambda: exact.top_k(q, k=args.k))
            times["exact"].append(t)
            for n, engine in engines.items():
                t, found[n] = timed(lambda engine=engine: engine.top_k(q, k=args.k))
                times.setdefault(n, []).append(t)
        t_exact = statistics.median(times["exact"])
        table = Table(
            title=f"top-{args.k} of {args.queries} queries, {len(store)} rows × {store.width}, cosine "
            f"(CPU, {torch.get_num_threads()} threads; medians of {args.repeats} interleaved repeats)",
            title_justify="left",
        )
        for col in ("search", f"recall@{args.k}", "seconds", "speed-up vs exact"):
            table.add_column(col, justify="left" if col == "search" else "right")
        table.add_row("exact scan", "1.000", f"{t_exact:.3f}", "1.0")
        rows = []
        for n in probes:
            t = statistics.median(times[n])
            rec = recall(found[n].indices, truth.indices)
            same = found[n].values.shape == truth.values.shape
            rows.append({"nprobe": n, "recall": rec, "seconds": t, "speedup": t_exact / t})
            label = f"index, nprobe {n}/{nlist}" + (" (calibrated)" if n == calibrated else "")
            table.add_row(label, f"{rec:.3f}", f"{t:.3f}", f"{t_exact / t:.1f}")
            assert same
        console.print(table)
        result = {
            "rows": len(store),
            "width": store.width,
            "queries": args.queries,
            "k": args.k,
            "nlist": nlist,
            "sample_rows": r["sample_rows"],
            "noise": args.noise,
            "calibration": r["calibration"],
            "build_seconds": t_build,
            "open_seconds": t_open,
            "index_bytes": r["bytes"],
            "store_bytes": store.nbytes,
            "exact_seconds": t_exact,
            "index": rows,
            "threads": torch.get_num_threads(),
        }
        console.print(f"index opened (checksum verified) in {t_open:.1f} s")
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        return result
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
