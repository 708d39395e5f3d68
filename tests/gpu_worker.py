"""One torchrun rank: a distributed InfluenceEngine (NCCL on CUDA, else gloo) against a plain
one on the same store; writes `result.json` into the output folder.

    torchrun --nproc_per_node 1 tests/gpu_worker.py RUN_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import logix
from logix import comm


def main() -> None:
    run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    device = "cuda" if cuda else "cpu"
    store = logix.open_store(run_dir)
    q = logix.Gradients.load(run_dir.parent / "q.safetensors")
    shared = logix.InfluenceEngine(store, "raw", 0.1, device=device, distributed=True)
    plain = logix.InfluenceEngine(store, "raw", 0.1, device=device)
    total = comm.all_reduce_sum(torch.ones(3, device=comm.comm_device()))
    result = {
        "backend": torch.distributed.get_backend(),
        "world": torch.distributed.get_world_size(),
        "all_reduce": total.cpu().tolist(),
        "scores_equal": bool(torch.equal(shared.scores(q).values, plain.scores(q).values)),
        "top_k_equal": shared.top_k(q, k=5).indices.tolist() == plain.top_k(q, k=5).indices.tolist(),
    }
    (out / "result.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
