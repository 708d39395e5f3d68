"""LogIX 0.1.x's first and repeat `raw` queries on the digits MLP, run in LogIX's own interpreter.

LogIX's package is also named `logix`, so it cannot share a Python process with this project:
`bench_first_query.py --logix-python PATH` runs this script in that interpreter (which must not
see this repository's `logix`), passing the trained model's weights as .npy files. The same work
as logix's rows: LoGra rank 64, the 1,397 training gradients logged with their covariance, then
`compute_influence_all(hessian="raw")` of the test queries against the whole log: the first call
(covariance inverse, log read) and --repeats repeat calls, with one `torch.matmul` of the scoring
shapes after each repeat (the calls taking turns). Prints one JSON line of seconds.

    python logix_ai_query.py WEIGHTS_DIR WORK_DIR --queries 100 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", help="directory of <parameter name>.npy files of the trained MLP")
    p.add_argument("work", help="an empty directory for LogIX's project")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import logix  # LogIX's, in this interpreter
    from logix.config import LoRAConfig

    if not hasattr(logix, "LogIX"):
        sys.exit(f"{logix.__file__} is not LogIX (logix-ai): give the interpreter of LogIX's environment")
    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    from common import load_digits, make_mlp  # numpy and torch only

    data = load_digits()
    model = make_mlp()
    weights = Path(args.weights).resolve()
    state = {
        k: torch.from_numpy(np.load(weights / f"{k}.npy", allow_pickle=False)) for k in model.state_dict()
    }
    model.load_state_dict(state)

    os.chdir(args.work)  # LogIX writes its project directory under the working directory
    run = logix.init(project="digits", config=None)
    run.watch(model)
    run.add_lora(lora_config=LoRAConfig(rank=64))
    run.setup({"grad": ["log", "covariance"]})
    run.save(True)
    for start in range(0, len(data.y_train), 256):
        ids = list(range(start, min(start + 256, len(data.y_train))))
        with run(data_id=ids):
            model.zero_grad()
            F.cross_entropy(model(data.x_train[ids]), data.y_train[ids], reduction="sum").backward()
    run.finalize()

    run.eval()
    run.setup({"grad": ["log"]})
    loader = run.build_log_dataloader(batch_size=512)
    qids = [f"q{i}" for i in range(args.queries)]
    with run(data_id=qids):
        model.zero_grad()
        xq, yq = data.x_test[: args.queries], data.y_test[: args.queries]
        F.cross_entropy(model(xq), yq, reduction="sum").backward()
    query = run.get_log(copy=True)

    def scores() -> None:
        run.influence.compute_influence_all(query, loader, hessian="raw")

    t = time.perf_counter()
    scores()
    first = time.perf_counter() - t
    width = sum(v["grad"].reshape(args.queries, -1).shape[1] for v in query[1].values())
    qm, rows = torch.randn(args.queries, width), torch.randn(len(data.y_train), width)
    repeat, matmul = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        scores()
        repeat.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.matmul(qm, rows.T)
        matmul.append(time.perf_counter() - t)
    version = getattr(logix, "__version__", "0.1.x")
    print(
        json.dumps({"version": version, "first": first, "repeat": repeat, "matmul": matmul, "width": width})
    )


if __name__ == "__main__":
    main()
