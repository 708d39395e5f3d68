"""Distributed logging and queries on CPU with gloo, measured in one run.

- query: `InfluenceEngine(..., distributed=True).top_k` on one synthetic store, by 1 process
  and by 2 processes (one thread each, so 2 processes use twice the cores), plus 1 process with
  2 threads for reference; the wall time is from the first rank entering the query to the last
  leaving it (the engine's set-up and the preconditioner are built before the clock starts),
  and the CPU time is the busiest rank's own (which a loaded machine inflates less);
- logging: seconds per DDP training step with logix / without, 2 gloo ranks, one thread each,
  on a small decoder (d_model 128, 2 layers, seq 64, batch 8 per rank; r = 32×32 per Linear),
  plain and logged steps interleaved in blocks so that machine noise hits both alike.

    python benchmarks/bench_distributed.py [--rows 65536 --width 1024 --queries 64]

Each measurement runs in fresh processes launched like torchrun (RANK / WORLD_SIZE, a file
rendezvous); rank 0 writes its timings to a JSON file the parent reads.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def launch(world: int, threads: int, args: list[str], out: Path) -> dict:
    """Run this file's worker on `world` ranks; rank 0's JSON result."""
    pg = out / f"pg-{time.monotonic_ns()}"
    env = {**os.environ, "WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(threads), "LOGIX_BENCH_PG": str(pg)}
    procs = [
        subprocess.Popen([sys.executable, __file__, *args, "--out", str(out)], env={**env, "RANK": str(r)})
        for r in range(world)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")
    return json.loads((out / "result.json").read_text())


# ---------------------------------------------------------------------------------- workers
def query_worker(a: argparse.Namespace) -> dict:
    import logix
    from logix import comm as dist
    from logix.store.gradients import Gradients

    store = logix.open_store(a.store)
    engine = logix.InfluenceEngine(
        store, "raw", 0.1, chunk_bytes=4096 * 4 * store.width, device="cpu", distributed=True
    )
    gen = torch.Generator().manual_seed(1)
    q = Gradients(
        torch.randn(a.queries, store.width, generator=gen),
        list(range(a.queries)),
        store.modules,
        store.fingerprint,
    )
    engine.top_k(q, k=10)  # warm the page cache and the code paths
    times, cpu = [], []
    for _ in range(a.repeats):
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        engine.top_k(q, k=10)
        cpu.append(time.process_time() - c)  # this rank's own work, whatever the machine's load
        dist.barrier()
        times.append(time.perf_counter() - t)
    return {
        "seconds": min(times),
        "cpu_seconds": max(dist.all_gather_object(min(cpu))),
        "rows_per_rank": dist.all_gather_object(len(engine._rows)),
    }


def logging_worker(a: argparse.Namespace) -> dict:
    import torch.nn.functional as F
    from models import TinyDecoder
    from torch.nn.parallel import DistributedDataParallel

    import logix
    from logix import comm as dist

    rank, _ = dist.rank_and_world()
    torch.manual_seed(0)
    vocab, seq = 512, 64
    model = DistributedDataParallel(TinyDecoder(vocab, d_model=128, n_layers=2, n_heads=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, vocab, (a.batch, seq + 1), generator=gen) for _ in range(8)]

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))

    config = {"projection": {"rank_in": 32, "rank_out": 32}, "capture": {"types": ["Linear"]}}
    run = logix.init(Path(a.out) / "logged", config=config, overwrite=True)
    run.watch(model)
    next_id = [rank * 10**9]

    def steps(n: int, logged: bool) -> float:
        dist.barrier()
        t = time.perf_counter()
        for i in range(n):
            tokens = data[i % len(data)]
            if logged:
                ids = list(range(next_id[0], next_id[0] + len(tokens)))
                next_id[0] += len(tokens)
                with run(data_id=ids):
                    loss(tokens).backward()
            else:
                loss(tokens).backward()
            opt.step()
            opt.zero_grad()
        if logged:
            run.flush()  # the rows are on disk: the writer's cost is inside the timing
        dist.barrier()
        return (time.perf_counter() - t) / n

    steps(5, False)
    steps(5, True)
    plain, logged = [], []
    for _ in range(a.blocks):
        plain.append(steps(a.steps, False))
        logged.append(steps(a.steps, True))
    run.finalize()
    return {"plain": statistics.median(plain), "logged": statistics.median(logged)}


def worker(a: argparse.Namespace) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{os.environ['LOGIX_BENCH_PG']}", rank=rank, world_size=world
    )
    result = query_worker(a) if a.worker == "query" else logging_worker(a)
    if rank == 0:
        Path(a.out, "result.json").write_text(json.dumps(result))
    # Leave without the interpreter's teardown, where gloo threads still holding DDP's work
    # objects can abort the process ("terminate called without an active exception").
    gc.collect()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch of the logging case")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--worker", choices=("query", "logging"), help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return

    from bench_query import build
    from rich.console import Console
    from rich.table import Table

    console = Console(width=130)
    load = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="logix-bench-dist-"))
    try:
        store = root / "store"
        store.mkdir()
        build(store, a.rows, a.width, "float32", 4096)
        common = ["--store", str(store), "--queries", str(a.queries), "--repeats", str(a.repeats)]
        one = launch(1, 1, ["--worker", "query", *common], root)
        two = launch(2, 1, ["--worker", "query", *common], root)
        one_2t = launch(1, 2, ["--worker", "query", *common], root)
        log = launch(
            2,
            1,
            [
                "--worker",
                "logging",
                "--batch",
                str(a.batch),
                "--steps",
                str(a.steps),
                "--blocks",
                str(a.blocks),
            ],
            root,
        )
        console.print(
            f"store {a.rows} rows × {a.width} float32 ({a.rows * a.width * 4 / 1e6:.0f} MB, "
            f"in page cache); {a.queries} queries, top-10; cores: {os.cpu_count()}, "
            f"load average at the start: {load:.1f}"
        )
        table = Table(title="distributed logix on CPU (gloo)", title_justify="left")
        for col in ("case", "wall s", "ratio", "CPU s of the busiest rank", "ratio "):
            table.add_column(col, justify="left" if col == "case" else "right")
        table.add_row(
            "query: 1 process, 1 thread", f"{one['seconds']:.3f}", "1.00", f"{one['cpu_seconds']:.3f}", "1.00"
        )
        table.add_row(
            f"query: 2 processes, 1 thread each, rows {two['rows_per_rank']} (speed-up)",
            f"{two['seconds']:.3f}",
            f"{one['seconds'] / two['seconds']:.2f}",
            f"{two['cpu_seconds']:.3f}",
            f"{one['cpu_seconds'] / two['cpu_seconds']:.2f}",
        )
        table.add_row(
            "query: 1 process, 2 threads (speed-up, reference)",
            f"{one_2t['seconds']:.3f}",
            f"{one['seconds'] / one_2t['seconds']:.2f}",
            "",
            "",
        )
        table.add_row(
            f"DDP step, 2 ranks, decoder, batch {a.batch}/rank: plain", f"{log['plain']:.4f}", "1.00", "", ""
        )
        table.add_row(
            "DDP step, 2 ranks, decoder: logged (r = 32×32 per Linear)",
            f"{log['logged']:.4f}",
            f"{log['logged'] / log['plain']:.2f}× plain",
            "",
            "",
        )
        console.print(table)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
