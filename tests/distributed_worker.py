"""One rank of the distributed tests: `python distributed_worker.py SCENARIO OUT_DIR`, with RANK
and WORLD_SIZE in the environment; the process group meets through a file in OUT_DIR (no port).

The model, data and training loop are shared with tests/test_distributed.py, which runs the same
loop in one process for the reference: rank r of W takes the r-th W-th of each global batch
(DistributedSampler-like, contiguous), so one process with the global batch sees the same data.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import shutil
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import logix

N_TRAIN, GLOBAL_BATCH, N_QUERY = 48, 8, 6
CONFIG = {
    "projection": {"rank_in": 4, "rank_out": 3, "seed": 3},
    "store": {"shard_rows": 5},
    "curvature": {"statistics": ["raw", "kfac"], "during_logging": True},
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(8, 16), act=nn.Tanh(), fc2=nn.Linear(16, 4)))


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N_TRAIN, 8, generator=g), torch.randint(0, 4, (N_TRAIN,), generator=g)
    xq, yq = torch.randn(N_QUERY, 8, generator=g), torch.randint(0, 4, (N_QUERY,), generator=g)
    return x, y, xq, yq


def train(model: nn.Module, rank: int, world: int, run=None) -> None:
    """SGD with momentum over the global batches; this rank's contiguous share of each."""
    x, y, _, _ = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    local = GLOBAL_BATCH // world
    for start in range(0, N_TRAIN, GLOBAL_BATCH):
        idx = list(range(start + rank * local, start + (rank + 1) * local))
        if run is None:
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        else:
            with run(data_id=idx):
                F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()


def query_gradients(run_dir: Path, model: nn.Module):
    _, _, xq, yq = make_data()
    q = logix.init(run_dir, mode="query")
    q.watch(model)
    with q(data_id=[f"q{i}" for i in range(N_QUERY)]):
        F.cross_entropy(model(xq), yq).backward()
    model.zero_grad(set_to_none=True)
    return q.gradients()


def save_results(engine, q, out: Path, tag: str, rank: int) -> None:
    """Every rank saves what it got, so the test can check all ranks agree."""
    engine.top_k(q, k=5).save(out / f"{tag}-top-r{rank}.safetensors")
    engine.top_k(q, k=4, mode="relative").save(out / f"{tag}-toprel-r{rank}.safetensors")
    engine.scores(q).save(out / f"{tag}-scores-r{rank}.safetensors")
    engine.scores(q, mode="cosine", per_module=True).save(out / f"{tag}-cos-r{rank}.safetensors")
    engine.self_influence().save(out / f"{tag}-self-r{rank}.safetensors")
    # Three matrix rows per block: rank 0 writes the file in several gathered pieces.
    engine.save_scores(q, out / f"{tag}-file.safetensors", block_bytes=3 * 4 * N_TRAIN)


def log_query(out: Path, rank: int, world: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    # Training is unchanged by logging under DDP.
    plain = DistributedDataParallel(make_model())
    train(plain, rank, world)
    logged = DistributedDataParallel(make_model())
    with logix.init(out / "ddp", config=CONFIG) as run:
        run.watch(logged)
        train(logged, rank, world, run)
    same = all(torch.equal(a, b) for a, b in zip(plain.parameters(), logged.parameters()))
    (out / f"train-equal-r{rank}.json").write_text(json.dumps(same))
    if rank == 0:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in logged.module.state_dict().items()},
            str(out / "ddp-params.safetensors"),
        )

    # FSDP (v1) renames every wrapped module '_fsdp_wrapped_module.…'; the store must not.
    fsdp = FullyShardedDataParallel(make_model(), device_id=torch.device("cpu"))
    with logix.init(out / "fsdp", config=CONFIG) as run:
        run.watch(fsdp)
        (out / f"coverage-fsdp-r{rank}.json").write_text(json.dumps(run.coverage().to_dict()))
        train(fsdp, rank, world, run)

    # FSDP v2 (fully_shard) keeps module names; parameters become DTensors.
    from torch.distributed.fsdp import fully_shard

    sharded = make_model()
    fully_shard(sharded.fc1)
    fully_shard(sharded)
    with logix.init(out / "fsdp2", config=CONFIG) as run:
        run.watch(sharded)
        (out / f"coverage-fsdp2-r{rank}.json").write_text(json.dumps(run.coverage().to_dict()))
        train(sharded, rank, world, run)

    # The distributed query, on the logged statistics.
    q = query_gradients(out / "ddp", logged)
    if rank == 0:
        q.save(out / "q.safetensors")
    chunk = 4 * 7 * logix.open_store(out / "ddp").width  # 7 rows
    engine = logix.InfluenceEngine(out / "ddp", "raw", damping=0.1, distributed=True, chunk_bytes=chunk)
    save_results(engine, q, out, "ddp", rank)

    # EK-FAC with refinement: every F V pass streams each rank's share, products all-reduced.
    engine = logix.InfluenceEngine(
        out / "ddp", "ekfac", damping=0.1, distributed=True, chunk_bytes=chunk, refine=3
    )
    engine.scores(q).save(out / f"refined-scores-r{rank}.safetensors")

    # Without logged statistics: each rank streams its share, the sums are all-reduced.
    if rank == 0:
        shutil.copytree(out / "ddp", out / "nostats", ignore=shutil.ignore_patterns("curvature"))
    torch.distributed.barrier()
    engine = logix.InfluenceEngine(out / "nostats", "raw", damping=0.1, distributed=True, chunk_bytes=chunk)
    engine.top_k(q, k=5).save(out / f"nostats-top-r{rank}.safetensors")


def duplicates(out: Path, rank: int, world: int) -> None:
    """Both ranks log id 3: finalize must say so on every rank."""
    model = make_model()
    x, y, _, _ = make_data()
    ids = [0, 1, 2, 3] if rank == 0 else [3, 4, 5]
    run = logix.init(out / "dup", config=CONFIG)
    run.watch(model)
    with run(data_id=ids):
        F.cross_entropy(model(x[ids]), y[ids]).backward()
    try:
        run.finalize()
        message = None
    except logix.StoreError as e:
        message = str(e)
    (out / f"dup-r{rank}.json").write_text(json.dumps(message))

    # Ranks that pass different queries to a distributed engine are stopped, all of them.
    q = query_gradients(out / "dup", model)
    store = logix.open_store(out / "dup", verify="none")
    engine = logix.InfluenceEngine(store, "identity", distributed=True)
    try:
        engine.top_k(q if rank == 0 else q.select([0, 1]), k=2)
        message = None
    except logix.StoreError as e:
        message = str(e)
    (out / f"queries-r{rank}.json").write_text(json.dumps(message))


def killed(out: Path, rank: int, world: int) -> None:
    """Rank 1 logs slowly until the test kills it; rank 0 logs its share and finalizes."""
    model = make_model()
    x, y, _, _ = make_data()
    if rank == 1:  # a late rank must still find the store new (init waits for every rank)
        time.sleep(1.0)
    run = logix.init(out / "killed", config={**CONFIG, "store": {"shard_rows": 2}})
    run.watch(model)
    if rank == 0:
        for start in range(0, 24, 4):
            idx = list(range(start, start + 4))
            with run(data_id=idx):
                F.cross_entropy(model(x[idx]), y[idx]).backward()
        (out / "rank0-logged").write_text("done")
        try:
            run.finalize()  # waits for rank 1 at the barrier, which fails once rank 1 is killed
        except logix.StoreError as e:
            (out / "rank0-finalize.json").write_text(json.dumps(str(e)))
    else:
        for start in range(24, 48, 2):
            idx = [start, start + 1]
            with run(data_id=idx):
                F.cross_entropy(model(x[idx]), y[idx]).backward()
            run.flush()
            time.sleep(0.2)
        raise SystemExit("rank 1 was expected to be killed before it logged everything")


SCENARIOS = {"log_query": log_query, "duplicates": duplicates, "killed": killed}

if __name__ == "__main__":
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{out / 'process-group'}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=180),
    )
    code = 0
    try:
        SCENARIOS[scenario](out, rank, world)
    except BaseException:  # noqa: BLE001 - reported, then the exit code says it
        traceback.print_exc()
        code = 1
    # Free DDP/FSDP state and the group while the interpreter is whole, then leave without its
    # teardown: gloo threads still holding work objects can abort it ("terminate called").
    gc.collect()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
