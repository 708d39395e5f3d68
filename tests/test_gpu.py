"""The CUDA paths of the query engine, tested where CUDA is present (skipped elsewhere): device
scores equal CPU scores for float32 / bfloat16 / float16 stores, rows cross the bus in the
storage dtype and are upcast on the device, host copies run on a side stream overlapped with the
scoring, and a distributed query runs under torchrun on NCCL. The CPU halves (the read-ahead
thread, low-precision stores on CPU, torchrun with gloo) run everywhere, so that
`benchmarks/gpu_check.sh` is known to work up to the CUDA calls."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from child_process import child_env
from query_helpers import build_store, mlp_modules, mlp_rows, queries

from logix.query.engine import InfluenceEngine
from logix.query.transfer import device_chunks, read_ahead
from logix.store.format import ModuleInfo
from logix.store.reader import open_store

HERE = Path(__file__).parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = ["float32", "bfloat16", "float16"]


def rel_err(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Per storage dtype and N (12: fc1 and fc2 in Gram form; 30: both eigendecomposed): the
    store, a float32 store of the same (rounded) rows, and those rows."""
    base = tmp_path_factory.mktemp("gpu")
    out = {}
    for dtype in DTYPES:
        for n in (12, 30):
            x = mlp_rows(n, seed=7).to(getattr(torch, dtype)).float()
            store = open_store(build_store(base / f"{dtype}-{n}", mlp_modules(), x, dtype=dtype))
            same = open_store(build_store(base / f"{dtype}-{n}-as-f32", mlp_modules(), x))
            out[dtype, n] = (store, same, x)
    return out


def test_read_ahead_keeps_order_raises_and_stops_early():
    assert list(read_ahead(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise RuntimeError("disk gone")

    got = []
    with pytest.raises(RuntimeError, match="disk gone"):
        for item in read_ahead(failing()):
            got.append(item)
    assert got == [1]
    first = next(iter(read_ahead(iter(range(10**6)))))  # abandoned: the thread must stop
    assert first == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_store_scores_equal_its_upcast_rows_on_cpu(stores, dtype):
    q = queries(mlp_rows(3, seed=8), mlp_modules())
    for n in (12, 30):
        store, same, x = stores[dtype, n]
        assert torch.equal(store.load(), x)  # the rows are exact in this dtype
        got = InfluenceEngine(store, "raw", 0.1, device="cpu").scores(q).values
        assert torch.equal(got, InfluenceEngine(same, "raw", 0.1, device="cpu").scores(q).values)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_on_cuda_matches_cpu(stores, dtype):
    q = queries(mlp_rows(3, seed=8), mlp_modules())
    for n in (12, 30):  # Gram form (N < w) and eigendecomposition form
        store, _, _ = stores[dtype, n]
        for kind in ("identity", "raw"):
            on_gpu = InfluenceEngine(store, kind, 0.1, device="cuda", chunk_bytes=4 * 4 * store.width)
            on_cpu = InfluenceEngine(store, kind, 0.1, device="cpu")
            for mode in ("dot", "cosine"):
                for _ in range(2):  # the second batch takes the kept-X̃ path of Gram blocks
                    assert (
                        rel_err(on_gpu.scores(q, mode=mode).values, on_cpu.scores(q, mode=mode).values) < 1e-4
                    )
            assert on_gpu.top_k(q, k=4).indices.tolist() == on_cpu.top_k(q, k=4).indices.tolist()
            assert rel_err(on_gpu.self_influence().values, on_cpu.self_influence().values) < 1e-4


class Spy:
    """A store whose iter_chunks records the dtype the rows are read in."""

    def __init__(self, store):
        self.store, self.dtypes = store, []
        self.width, self.dtype = store.width, store.dtype

    def iter_chunks(self, rows, *, dtype, buffers):
        self.dtypes.append(dtype)
        return self.store.iter_chunks(rows=rows, dtype=dtype, buffers=buffers)


@cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rows_cross_the_bus_in_storage_dtype_and_are_upcast_on_device(stores, dtype):
    store, _, x = stores[dtype, 30]
    spy = Spy(store)
    chunks = list(device_chunks(spy, torch.device("cuda"), 7))
    assert spy.dtypes == [getattr(torch, dtype)]  # half the bytes of float32 are copied
    assert all(c.device.type == "cuda" and c.dtype == torch.float32 for _, c in chunks)
    assert torch.equal(torch.cat([c for _, c in chunks]).cpu(), x)


@cuda
def test_copies_run_on_a_side_stream_overlapped_with_scoring(tmp_path):
    from torch.profiler import ProfilerActivity, profile

    rows, width = 16 * 4096, 1024
    x = torch.randn(rows, width)
    modules = [ModuleInfo("m", "Linear", 32, 32, 32, 32, False, 0)]
    store = open_store(build_store(tmp_path / "big", modules, x, shard_rows=4096, statistics=False))
    q = queries(torch.randn(512, width), modules)
    engine = InfluenceEngine(store, "identity", device="cuda", chunk_bytes=4096 * width * 4)
    engine.scores(q)  # warm-up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.scores(q)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    copies = [e for e in events if "Memcpy HtoD" in e.name]
    kernels = [e for e in events if "Memcpy" not in e.name and "Memset" not in e.name]
    assert copies and kernels
    copy_streams = {getattr(e, "stream", None) for e in copies}
    kernel_streams = {getattr(e, "stream", None) for e in kernels}
    if None not in copy_streams | kernel_streams:
        assert copy_streams.isdisjoint(kernel_streams)  # copies on the side stream
    overlap = any(
        c.time_range.start < k.time_range.end and k.time_range.start < c.time_range.end
        for c in copies
        for k in kernels
    )
    assert overlap, "no host-to-device copy overlapped a kernel"
    on_cpu = InfluenceEngine(store, "identity", device="cpu").scores(q).values
    assert rel_err(engine.scores(q).values, on_cpu) < 1e-5


def torchrun(tmp_path, stores) -> dict:
    exe = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(exe).exists():
        pytest.skip("torchrun is not installed")
    store, _, _ = stores["float32", 30]
    run_dir = tmp_path / "run"
    shutil.copytree(store.path, run_dir)
    queries(mlp_rows(3, seed=8), mlp_modules()).save(tmp_path / "q.safetensors")
    env = child_env(OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            exe,
            "--standalone",
            "--nproc_per_node",
            "1",
            str(HERE / "gpu_worker.py"),
            str(run_dir),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
def test_torchrun_one_process(tmp_path, stores):
    result = torchrun(tmp_path, stores)
    assert result["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert result["world"] == 1 and result["all_reduce"] == [1.0, 1.0, 1.0]
    assert result["scores_equal"] and result["top_k_equal"]
