"""Logging overhead: time per training step with logix / without, measured in one run.

    python benchmarks/bench_logging.py            # both cases, a table of ratios
    python benchmarks/bench_logging.py --quick    # fewer steps

(a) MLP 64-256-10 on 8×8-digit-sized data, batch 64, r = 64×64 per layer;
(b) a decoder (d_model 256, 4 layers, seq 128, batch 16), r = 32×32 per Linear;
plus the store's write rate against this disk's sequential write rate (dd-style).
Plain and logged steps are interleaved in blocks so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import TinyDecoder, digits_mlp  # noqa: E402

import logix  # noqa: E402
from logix.store.reader import TORCH_DTYPES  # noqa: E402


def mlp_case(batch: int = 64):
    torch.manual_seed(0)
    model = digits_mlp()
    data = [(torch.randn(batch, 64), torch.randint(0, 10, (batch,))) for _ in range(32)]
    loss = lambda m, xy: F.cross_entropy(m(xy[0]), xy[1])  # noqa: E731
    return model, data, loss, {"projection": {"rank_in": 64, "rank_out": 64}}


def decoder_case(batch: int = 16, seq: int = 128, vocab: int = 512):
    torch.manual_seed(0)
    model = TinyDecoder(vocab, d_model=256, n_layers=4, n_heads=4)
    data = [(torch.randint(0, vocab, (batch, seq)),) for _ in range(4)]

    def loss(m, xy):
        tokens = xy[0]
        logits = m(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))

    cfg = {"projection": {"rank_in": 32, "rank_out": 32}, "capture": {"types": ["Linear"]}}
    return model, data, loss, cfg


def time_steps(model, data, loss_fn, opt, steps, run=None, start_id=0):
    """Seconds per step over `steps` steps (forward, backward, optimizer step)."""
    t0 = time.perf_counter()
    for i in range(steps):
        xy = data[i % len(data)]
        if run is None:
            loss_fn(model, xy).backward()
        else:
            ids = list(range(start_id + i * xy[0].shape[0], start_id + (i + 1) * xy[0].shape[0]))
            with run(data_id=ids):
                loss_fn(model, xy).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def merge(cfg: dict, extra: dict | None) -> dict:
    out = {k: dict(v) for k, v in cfg.items()}
    for k, v in (extra or {}).items():
        out.setdefault(k, {}).update(v)
    return out


def measure(name, case, steps, rounds, tmp: Path, extra_cfg=None, discard=False):
    """Plain vs logged training steps, interleaved; `discard` drops rows instead of writing
    them (the capture's own cost, without the disk)."""
    model, data, loss_fn, cfg = case()
    cfg = merge(cfg, extra_cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    run = logix.init(tmp / name, config=cfg, overwrite=True)
    run.watch(model)
    if discard:
        run.writer.add_checked = lambda ids, rows, nonfinite: None
    time_steps(model, data, loss_fn, opt, 3)  # warm-up both paths
    time_steps(model, data, loss_fn, opt, 3, run, start_id=10**9)
    plain, logged, next_id = [], [], 0
    for _ in range(rounds):
        plain.append(time_steps(model, data, loss_fn, opt, steps))
        logged.append(time_steps(model, data, loss_fn, opt, steps, run, start_id=next_id))
        next_id += steps * data[0][0].shape[0]
    t0 = time.perf_counter()
    run.finalize()  # includes writing the last shard
    tail = time.perf_counter() - t0
    p, lg = statistics.median(plain), statistics.median(logged)
    store = logix.open_store(tmp / name)
    itemsize = TORCH_DTYPES[store.dtype].itemsize
    mb = data[0][0].shape[0] * store.width * itemsize / 2**20
    return {
        "name": name,
        "plain_ms": p * 1e3,
        "logged_ms": lg * 1e3,
        "ratio": lg / p,
        "mb_per_step": 0.0 if discard else mb,
        "finalize_s": tail,
    }


def separate_pass(name, case, steps, rounds, tmp: Path):
    """A logging pass over a fixed checkpoint: full backward vs `attribution_only` (no
    weight-gradient work). Returns ms/step of both."""
    model, data, loss_fn, cfg = case()
    times = {}
    for only in (False, True):
        run = logix.init(
            tmp / f"{name}-{only}", config=merge(cfg, {"capture": {"attribution_only": only}}), overwrite=True
        )
        run.watch(model)
        runs = []
        for r in range(rounds):
            t0 = time.perf_counter()
            for i in range(steps):
                xy = data[i % len(data)]
                b = xy[0].shape[0]
                with run(data_id=list(range((r * steps + i) * b, (r * steps + i + 1) * b))):
                    loss_fn(model, xy).backward()
                model.zero_grad(set_to_none=True)
            runs.append((time.perf_counter() - t0) / steps)
        run.finalize()
        times[only] = statistics.median(runs) * 1e3
    return {"name": name, "full_ms": times[False], "attribution_only_ms": times[True]}


def disk_write_rate(tmp: Path, mb: int = 256) -> float:
    """MB/s of one large sequential write + fsync on the same filesystem (dd-style)."""
    buf = os.urandom(1 << 20)
    path = tmp / "dd.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    rate = mb / (time.perf_counter() - t0)
    path.unlink()
    return rate


def store_write_rate(tmp: Path, mb: int = 256) -> float:
    """MB/s of the store writer alone (rows already in memory), including fsync per shard."""
    from logix.store.create import create_store
    from logix.store.format import ModuleInfo
    from logix.store.writer import StoreWriter

    width = 4096
    rows_total = mb * (1 << 20) // (4 * width)
    run_dir = tmp / "write-rate"
    module = ModuleInfo("layer", "Linear", width, 1, width, 1, False, 0)
    create_store(run_dir, {"store": {"dtype": "float32"}}, "", [module], b"", {}, 1)
    block = torch.randn(1024, width)
    t0 = time.perf_counter()
    with StoreWriter(run_dir, width=width, dtype="float32", shard_rows=4096) as w:
        for i in range(0, rows_total, 1024):
            w.add(list(range(i, i + 1024)), block.clone())
    return rows_total * width * 4 / (1 << 20) / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=130)
    rounds = 3 if args.quick else 7
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        n_mlp, n_dec = (20, 2) if args.quick else (50, 4)
        results = [
            measure("mlp 64-256-10, b64, r64x64", mlp_case, n_mlp, rounds, tmp),
            measure("  same, float16 store", mlp_case, n_mlp, rounds, tmp, {"store": {"dtype": "float16"}}),
            measure("  same, bfloat16 store", mlp_case, n_mlp, rounds, tmp, {"store": {"dtype": "bfloat16"}}),
            measure("  same, rows discarded (capture only)", mlp_case, n_mlp, rounds, tmp, discard=True),
            measure("decoder d256 L4 T128, b16, r32x32", decoder_case, n_dec, rounds, tmp),
            measure(
                "  same, statistics during logging",
                decoder_case,
                n_dec,
                rounds,
                tmp,
                {"curvature": {"during_logging": True}},
            ),
        ]
        passes = [separate_pass("decoder separate pass", decoder_case, n_dec, rounds, tmp)]
        disk = disk_write_rate(tmp)
        writer = store_write_rate(tmp)
    table = Table(title=f"logging overhead (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for col in ("case", "plain ms/step", "logged ms/step", "logged / plain", "MB/step written", "finalize s"):
        table.add_column(col, justify="right" if col != "case" else "left")
    for r in results:
        table.add_row(
            r["name"],
            f"{r['plain_ms']:.2f}",
            f"{r['logged_ms']:.2f}",
            f"{r['ratio']:.2f}x",
            f"{r['mb_per_step']:.2f}",
            f"{r['finalize_s']:.2f}",
        )
    console.print(table)
    for r in passes:
        console.print(
            f"{r['name']}: full backward {r['full_ms']:.1f} ms/step, attribution_only "
            f"{r['attribution_only_ms']:.1f} ms/step (saves "
            f"{1 - r['attribution_only_ms'] / r['full_ms']:.0%})"
        )
    console.print(
        f"store write rate {writer:.0f} MB/s vs sequential write+fsync {disk:.0f} MB/s = {writer / disk:.2f}"
    )


if __name__ == "__main__":
    main()
