"""The crash loop of a run that trains, logs its rows, records its trajectory and fits K-FAC in
a statistics pass (`python scripts/crash_loop.py --trajectory`; see crash_loop.py's doc)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAINING = r"""
import torch
import torch.nn.functional as F
from torch import nn
def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(torch.float64)
def step_ids(t, batch):
    return list(range(t * batch, (t + 1) * batch))
def examples(ids):
    x = torch.stack([torch.cos(torch.arange(8.0, dtype=torch.float64) * (i + 1) * 0.11) for i in ids])
    return x, torch.tensor([i % 4 for i in ids])
def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")
def lr(t):
    return 0.2 * 0.99**t
"""

CHILD_TRAJECTORY = (
    TRAINING
    + r"""
import json, os, signal, sys, time
torch.set_num_threads(1)
import logix
run_dir, steps, batch, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
progress = sys.argv[5]
config, pause, kill = json.loads(sys.argv[6]), float(sys.argv[7]), sys.argv[8]
if kill == "finalize":  # killed inside run.finalize(): the trajectory closed, the writer not
    import logix.store.writer
    logix.store.writer.StoreWriter.close = lambda self: os.kill(os.getpid(), signal.SIGKILL)
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=lr(0), momentum=0.9)
# The README's recipe for a run that records its trajectory:
run = logix.init(run_dir, config=config, resume=True)
run.watch(model, optimizer=opt, trajectory_every=every)
start = run.restore_trajectory()  # the model and optimizer as before step `start`
out = open(progress, "a", buffering=1)
print("ready", flush=True)
for t in range(start, steps):
    for group in opt.param_groups:
        group["lr"] = lr(t)
    ids = step_ids(t, batch)
    with run(data_id=ids):
        loss_fn(model, examples(ids)).mean().backward()
    opt.step()
    opt.zero_grad()
    out.write(json.dumps(ids) + "\n")
    time.sleep(pause)
run.finalize()
# The statistics pass (K-FAC factors at the final weights), in full again after a kill:
fit = logix.init(run_dir, resume=True)
fit.watch(model)
with fit.fit_curvature():
    for t in range(steps):
        if kill == "pass" and t == steps // 2:
            os.kill(os.getpid(), signal.SIGKILL)
        ids = step_ids(t, batch)
        with fit(data_id=ids):
            loss_fn(model, examples(ids)).mean().backward()
        model.zero_grad()
fit.finalize()
print("finished", flush=True)
"""
)


def _start_trajectory(run_dir: Path, args, progress: Path, config: dict, kill: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CHILD_TRAJECTORY, str(run_dir), str(args.steps), str(args.batch)]
    cmd += [str(args.every), str(progress), json.dumps(config), str(args.pause), kill]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "finished" in out, err


def _scores(run_dir: Path, training: dict) -> dict:
    """Replay and raw / kfac / ekfac scores of the first 3 training examples as queries."""
    import torch

    import logix
    from logix.store.trajectory import Trajectory

    traj = Trajectory(run_dir)
    model, queries = training["make_model"](), [0, 1, 2]
    out = {
        "unroll": logix.unroll.unroll(
            run_dir,
            model,
            training["loss_fn"],
            training["examples"],
            (queries, training["examples"](queries)),
            progress=False,
        ).values
    }
    final = traj.checkpoint(traj.n_steps)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(final.params[n])
    query = logix.init(run_dir, mode="query")
    query.watch(model)
    with query(data_id=queries):
        training["loss_fn"](model, training["examples"](queries)).mean().backward()
    q = query.gradients()
    for kind in ("raw", "kfac", "ekfac"):
        out[kind] = logix.InfluenceEngine(logix.open_store(run_dir), kind, 0.1).scores(q).values
    return out


def trajectory_loop(args, rng: random.Random) -> int:
    """The crash loop of a run that records its trajectory and fits K-FAC (see the module doc)."""
    import torch

    import logix
    from logix.store.trajectory import Trajectory

    training: dict = {}
    exec(TRAINING, training)  # the child's model, data and loss, for the replay here
    config = {
        "projection": {"kind": "random", "rank_in": 4, "rank_out": 3, "seed": 0},
        "store": {"shard_rows": args.shard_rows},
        "curvature": {"statistics": ["raw", "kfac"]},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _finish(_start_trajectory(tmp / "clean", args, tmp / "clean.progress", config, "none"))
        run_dir, kills, lives = tmp / "crashy", 0, 0
        # Random kills until args.kills have landed (one that comes after the child ended is a
        # clean life), then one inside finalize() and one in the statistics pass.
        while kills < args.kills + 2 and lives < args.kills + 1000:
            kill = "random" if kills < args.kills else ("finalize", "pass")[kills - args.kills]
            proc = _start_trajectory(run_dir, args, tmp / f"life{lives}.progress", config, kill)
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            if kill == "random":
                time.sleep(rng.uniform(0, args.max_delay))
                proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=600)
            assert proc.returncode in (0, -signal.SIGKILL), err
            kills += proc.returncode == -signal.SIGKILL
            try:
                steps = f"trajectory at step {Trajectory(run_dir).n_steps}"
            except logix.StoreError:  # killed before the first checkpoint
                steps = "no checkpoint yet"
            ended = "killed" if proc.returncode else "finished"
            print(f"life {lives} ({kill}): {ended}, {steps}", flush=True)
            lives += 1
        _finish(_start_trajectory(run_dir, args, tmp / "last.progress", config, "none"))
        store, reference = (
            logix.open_store(run_dir, verify="full"),
            logix.open_store(tmp / "clean", verify="full"),
        )
        ids = store.data_ids
        assert len(ids) == len(set(ids)), "an id is stored twice"
        assert sorted(ids) == sorted(reference.data_ids), "ids are missing"
        order = {i: k for k, i in enumerate(reference.data_ids)}
        assert torch.equal(store.load(), reference.load()[[order[i] for i in ids]]), "rows differ"
        assert Trajectory(run_dir).steps() == Trajectory(tmp / "clean").steps(), "the trajectory differs"
        got, clean = _scores(run_dir, training), _scores(tmp / "clean", training)
        gaps = {k: float((got[k] - clean[k]).abs().max() / clean[k].abs().max()) for k in clean}
        bounds = {"unroll": 1e-12, "raw": 1e-5, "kfac": 1e-6, "ekfac": 1e-6}  # raw: summation order
        assert all(gaps[k] <= bounds[k] for k in gaps), f"scores differ from a clean run: {gaps}"
    print(
        f"{kills} kills (logging, finalize, statistics pass): store, trajectory, replay and "
        f"raw/kfac/ekfac scores equal to a clean run (largest relative gaps {gaps})"
    )
    return 0 if kills == args.kills + 2 else 1
