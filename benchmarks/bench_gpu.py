"""What `benchmarks/gpu_check.sh` reports on a GPU (issue #14 item 5), one run each:

- the device's GEMM rate in bf16 and fp32 (one large `torch.matmul`);
- query rate: `InfluenceEngine.scores` (identity and raw) on a synthetic store streamed from the
  host, as a fraction of the fp32 GEMM rate (the scores are fp32 products of the upcast rows);
- logged/plain training step on the bench decoder and on a GPT-2-size decoder (≥ 100M
  parameters, built from a config: no weights are downloaded), and the store's write rate.

    python benchmarks/bench_gpu.py [--device cuda]          # on a GPU
    python benchmarks/bench_gpu.py --device cpu --smoke     # tiny sizes: the script runs here
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_query import build  # noqa: E402
from models import TinyDecoder  # noqa: E402

import logix  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best of `repeats` wall times of fn() (device work included)."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an [n, n] × [n, n] product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2.0 * n**3 / timed(lambda: a @ b, device, repeats)


def query_rates(
    root: Path, device: torch.device, rows: int, width: int, n_query: int, repeats: int
) -> dict[str, float]:
    """FLOP/s of the engine's scores (2·n·N·D per call) for identity and raw."""
    run = root / "query"
    run.mkdir(parents=True)
    build(run, rows, width, "bfloat16", 4096)
    store = logix.open_store(run)
    q = logix.Gradients(torch.randn(n_query, width), list(range(n_query)), store.modules, store.fingerprint)
    flop = 2.0 * n_query * rows * width
    out = {}
    for kind in ("identity", "raw"):
        engine = logix.InfluenceEngine(store, kind, 0.1, device=device)
        out[kind] = flop / timed(lambda e=engine: e.scores(q), device, repeats)
    return out


def step_ratio(
    root: Path,
    name: str,
    model: torch.nn.Module,
    device: torch.device,
    batch: int,
    seq: int,
    vocab: int,
    rank: int,
    steps: int,
) -> dict[str, float]:
    """Mean plain and logged step time (forward, backward, SGD) and the store's write rate."""
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)

    def step(run=None, ids=None):
        ctx = run(data_id=ids) if run is not None else None
        if ctx is not None:
            ctx.__enter__()
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        if ctx is not None:
            ctx.__exit__(None, None, None)
        opt.step()
        opt.zero_grad(set_to_none=True)

    config = {
        "projection": {"kind": "random", "rank_in": rank, "rank_out": rank},
        "capture": {"types": ["Linear"]},
        "store": {"dtype": "bfloat16"},
    }
    run = logix.init(root / name, config=config, overwrite=True)
    run.watch(model)
    step()
    step(run, list(range(batch)))  # warm-up of both paths
    plain, logged = [], []
    for i in range(steps):  # interleaved, so that drift hits both alike
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        step(run, list(range(batch * (i + 1), batch * (i + 2))))
        sync(device)
        logged.append(time.perf_counter() - t)
    t = time.perf_counter()
    run.finalize()
    finalize = time.perf_counter() - t
    store = logix.open_store(root / name)
    written = store.nbytes
    params = sum(p.numel() for p in model.parameters())
    return {
        "params": params,
        "plain": sum(plain) / steps,
        "logged": sum(logged) / steps,
        "write_rate": written / (sum(logged) + finalize),
        "width": store.width,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script, not a GPU)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    smoke = args.smoke
    root = Path(tempfile.mkdtemp(prefix="logix-gpu-"))
    try:
        n = 256 if smoke else 8192
        bf16 = gemm_rate(device, torch.bfloat16, n, args.repeats)
        fp32 = gemm_rate(device, torch.float32, n, args.repeats)
        print(f"GEMM {n}³: bf16 {bf16 / 1e12:.1f} TFLOP/s, fp32 {fp32 / 1e12:.1f} TFLOP/s")
        rows, width, n_query = (4096, 1024, 64) if smoke else (262144, 4096, 4096)
        rates = query_rates(root, device, rows, width, n_query, args.repeats)
        for kind, rate in rates.items():
            print(
                f"query {kind}: {rows} rows × {width} (bf16 store), {n_query} queries: "
                f"{rate / 1e12:.2f} TFLOP/s = {rate / fp32:.2f} of fp32 GEMM, {rate / bf16:.2f} of bf16"
            )
        vocab = 512 if smoke else 50257
        models = {"bench decoder": TinyDecoder(512, 256, 4, 4, max_len=128)}
        models["GPT-2-size decoder"] = (
            TinyDecoder(vocab, 64, 2, 4, max_len=128)
            if smoke
            else TinyDecoder(vocab, 768, 12, 12, max_len=1024)
        )
        for name, model in models.items():
            v = 512 if name == "bench decoder" else vocab
            batch, seq = (4, 32) if smoke else (16, 128 if name == "bench decoder" else 512)
            r = step_ratio(
                root,
                name.replace(" ", "-"),
                model,
                device,
                batch,
                seq,
                v,
                16 if smoke else 32,
                3 if smoke else 20,
            )
            print(
                f"{name} ({r['params'] / 1e6:.1f}M parameters, batch {batch}×{seq}, r=32×32, "
                f"D={r['width']}): plain {r['plain'] * 1e3:.1f} ms, logged "
                f"{r['logged'] * 1e3:.1f} ms, logged/plain {r['logged'] / r['plain']:.2f}; "
                f"store write {r['write_rate'] / 1e6:.0f} MB/s"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
