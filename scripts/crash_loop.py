"""Crash loop: SIGKILL a logging process at random moments, resume it each time with the
README's recipe, and check that the final store holds every id exactly once with rows equal to
a clean run. Also measures the rows a kill loses (accepted by `with run(...)`, not on disk).

    python scripts/crash_loop.py --kills 20          # prints one line per kill and a summary
    python scripts/crash_loop.py --trajectory --kills 20

`--trajectory`: the run trains a model, logs its rows and records its trajectory
(`run.watch(model, optimizer=opt)`), then fits K-FAC factors in a statistics pass
(`run.fit_curvature()`); kills land at random moments, then once inside `finalize()` and once
in the middle of the statistics pass; each life resumes with the README's recipe for such a run
(`run.restore_trajectory()`, train from that step, then the pass in full). The final store,
trajectory, replay (`logix.unroll`) and raw / kfac / ekfac scores must equal a clean run's.

Exit code 0 when every check holds. The CI test `tests/test_crash_loop.py` runs it with fewer
kills. One thread per process: it is meant for a small shared CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from torch import nn
import logix
run_dir, n_ids, batch, progress = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config, pause = json.loads(sys.argv[5]), float(sys.argv[6])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
# The README's resume recipe:
run = logix.init(run_dir, config=config, resume=True)
run.watch(model)
done = run.logged_ids()
out = open(progress, "a", buffering=1)
print("ready", flush=True)
for start in range(0, n_ids, batch):
    ids = [i for i in range(start, min(start + batch, n_ids)) if i not in done]
    if not ids:
        continue
    x = torch.stack([torch.cos(torch.arange(8.0) * (i + 1) * 0.11) for i in ids])
    y = torch.tensor([i % 4 for i in ids])
    with run(data_id=ids):
        nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad()
    out.write(json.dumps(ids) + "\n")  # accepted: the caller believes these rows are logged
    time.sleep(pause)  # a training step's other work; the kill lands anywhere in it
run.finalize()
print("finished", flush=True)
"""


def _start(run_dir: Path, args, progress: Path, config: dict, pause: float) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        str(run_dir),
        str(args.ids),
        str(args.batch),
        str(progress),
        json.dumps(config),
        str(pause),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _accepted(progress: Path) -> list[int]:
    if not progress.exists():
        return []
    ids = []
    for line in progress.read_text().splitlines():
        try:
            ids += json.loads(line)
        except ValueError:  # a line cut by the kill
            pass
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--trajectory", action="store_true", help="train, record, fit K-FAC (see above)")
    parser.add_argument("--steps", type=int, default=200, help="--trajectory: optimizer steps")
    parser.add_argument("--every", type=int, default=4, help="--trajectory: checkpoint interval")
    parser.add_argument("--ids", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shard-rows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=1.0, help="seconds after 'ready'")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between batches")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    if args.trajectory:
        from crash_loop_trajectory import trajectory_loop  # beside this script

        return trajectory_loop(args, rng)
    config = {
        "projection": {"kind": "random", "rank_in": 4, "rank_out": 3, "seed": 0},
        "store": {"shard_rows": args.shard_rows},
    }

    import torch

    import logix

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean = _start(tmp / "clean", args, tmp / "clean.progress", config, 0.0)
        out, err = clean.communicate(timeout=600)
        assert clean.returncode == 0, err
        run_dir, losses, kills = tmp / "crashy", [], 0
        for life in range(args.kills + 1000):
            progress = tmp / f"life{life}.progress"
            proc = _start(run_dir, args, progress, config, args.pause)
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            last = kills == args.kills
            if not last:
                time.sleep(rng.uniform(0, args.max_delay))
            if last or proc.poll() is not None:
                out, err = proc.communicate(timeout=600)
                assert proc.returncode == 0 and "finished" in out, err
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            accepted = _accepted(progress)
            lost = logix.open_store(run_dir, verify="none").missing_ids(accepted)
            losses.append(len(lost))
            print(
                f"kill {kills:2d}: {len(accepted)} rows accepted in this life, {len(lost)} not on "
                f"disk ({len(lost) / args.shard_rows:.2f} shards of {args.shard_rows} rows)",
                flush=True,
            )
        store = logix.open_store(run_dir, verify="full")
        reference = logix.open_store(tmp / "clean", verify="full")
        ids = store.data_ids
        assert len(ids) == len(set(ids)), "an id is stored twice"
        assert sorted(ids) == list(range(args.ids)), "ids are missing"
        rows, ref = store.load(), reference.load()
        order = {i: k for k, i in enumerate(reference.data_ids)}
        assert torch.equal(rows, ref[[order[i] for i in ids]]), "rows differ from a clean run"
    worst = max(losses, default=0)
    print(
        f"{kills} kills: every id stored exactly once, rows equal to a clean run; worst loss "
        f"of one kill {worst} rows = {worst / args.shard_rows:.2f} x shard_rows "
        f"(bound: 3 x shard_rows = {3 * args.shard_rows})"
    )
    return 0 if kills == args.kills and worst < 3 * args.shard_rows else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
