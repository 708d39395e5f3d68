"""Log the digits MLP while training it under DistributedDataParallel, then ask a distributed
top-k: which training images helped each of a few test images most?

    torchrun --nproc_per_node 2 examples/distributed/log_and_query.py     # CPUs: gloo
    torchrun --nproc_per_node 4 examples/distributed/log_and_query.py     # GPUs: NCCL, one per rank
    python examples/distributed/log_and_query.py                          # one process, same code

Each rank logs its own share of every epoch's batches into the same store (its own shards and
index); `run.finalize()` is collective and checks that no data id was logged by two ranks. The
query splits the store's shards over the ranks, and every rank gets the same merged top-k.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "digits"))
from common import accuracy, load_digits, make_mlp  # noqa: E402

import logix  # noqa: E402
from logix.comm import rank_and_world  # noqa: E402

CONFIG = {
    "projection": {"kind": "random", "rank_in": 64, "rank_out": 64, "seed": 0},
    "capture": {"loss_reduction": "mean"},  # mean over the rank's local batch: undone per example
    "curvature": {"statistics": ["raw"], "during_logging": True},  # per-rank files, summed on load
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/digits-ddp", help="the store directory")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    p.add_argument("--queries", type=int, default=4)
    args = p.parse_args()

    if "RANK" in os.environ:  # launched by torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank, world = rank_and_world()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")

    data = load_digits()
    ids = torch.arange(len(data.y_train))
    train = TensorDataset(ids, data.x_train, data.y_train)
    # drop_last=True: without it the sampler repeats examples to even out the ranks, and a
    # repeated id is logged twice (finalize and open_store would refuse the store).
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train, batch_size=args.batch // world, sampler=sampler)

    model = make_mlp(seed=0).to(device)
    ddp = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    run = logix.init(args.out, config=CONFIG, overwrite=True)
    run.watch(ddp)  # module names as in the unwrapped model: fc1, fc2
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        logging = epoch == args.epochs - 1  # log the last epoch of real training
        for batch_ids, x, y in loader:
            x, y = x.to(device), y.to(device)
            if logging:
                with run(data_id=batch_ids):
                    F.cross_entropy(ddp(x), y).backward()
            else:
                F.cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
    run.finalize()  # collective: every rank calls it

    # Queries: every rank captures the same test images; each scores its share of the shards.
    test_ids = list(range(args.queries))
    query = logix.init(args.out, mode="query")
    query.watch(ddp)
    with query(data_id=[f"test-{i}" for i in test_ids]):
        F.cross_entropy(ddp(data.x_test[test_ids].to(device)), data.y_test[test_ids].to(device)).backward()
    ddp.zero_grad(set_to_none=True)
    engine = logix.InfluenceEngine(args.out, "raw", damping=0.1, device=device, distributed=True)
    top = engine.top_k(query.gradients(), k=5)

    if rank == 0:
        store = logix.open_store(args.out)
        print(
            f"{world} rank(s) logged {len(store)} rows into {args.out} "
            f"(ranks: {store.rank_status()}); test accuracy "
            f"{accuracy(model.cpu(), data.x_test, data.y_test):.3f}"
        )
        for qid, train_ids, scores in zip(top.query_ids, top.train_ids, top.values.tolist()):
            label = int(data.y_test[int(qid.split("-")[1])])
            helpers = ", ".join(
                f"#{t} (digit {int(data.y_train[t])}, {s:+.2f})" for t, s in zip(train_ids, scores)
            )
            print(f"{qid} (digit {label}): {helpers}")
        top.save(Path(args.out) / "top5.json")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
