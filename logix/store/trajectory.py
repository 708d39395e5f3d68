"""The on-disk form of a recorded training trajectory, for exact replay (`logix.unroll`).

    RUN_DIR/trajectory/
      index.json                          optimizer kind, parameter table, k, completed files
      steps/steps-<first>.json            per optimizer step: data ids of each block, hyperparameters
      checkpoints/step-<t>.safetensors    parameters and optimizer state before step t

A checkpoint is taken before every k-th step and after the last one. The steps of an interval
[c_j, c_{j+1}) are written just before checkpoint c_{j+1}; every file is written under a
temporary name, fsynced and renamed, and the index (replaced atomically afterwards) lists only
completed files. After a crash the trajectory therefore replays up to its last checkpoint, and
a resumed run continues it from its last complete step (`TrajectoryWriter.resume`). File names
are derived from step numbers, never taken from the index; nothing is unpickled.
This module knows nothing of torch modules or optimizers: names, shapes and tensors only.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from logix.errors import StoreError
from logix.store.format import file_crc32, read_json, read_tagged_json, write_atomic, write_json_atomic
from logix.store.paths import inside

TRAJECTORY_DIR = "trajectory"
TRAJECTORY_FORMAT = "logix-trajectory"
TRAJECTORY_VERSION = 1
CHECKPOINT_FORMAT = "logix-trajectory-checkpoint"
INDEX = "index.json"


def trajectory_dir(run_dir: str | Path) -> Path:
    """The trajectory's directory, checked (`paths.inside`: no link on the way)."""
    return inside(run_dir, TRAJECTORY_DIR)


def checkpoint_name(step: int) -> str:
    return f"checkpoints/step-{int(step):08d}.safetensors"


def steps_name(first: int) -> str:
    return f"steps/steps-{int(first):08d}.json"


@dataclass(frozen=True)
class Checkpoint:
    """Parameters and optimizer state before step `step`. params: name -> tensor; state:
    state key (e.g. 'momentum_buffer') -> name -> tensor; counts: name -> optimizer step count
    (Adam); initialised: names whose optimizer state exists (SGD momentum)."""

    step: int
    params: dict[str, torch.Tensor]
    state: dict[str, dict[str, torch.Tensor]]
    counts: dict[str, int]
    initialised: list[str]


class TrajectoryWriter:
    """Writes one trajectory; `header` holds the optimizer kind, the parameter table
    ([{name, shape, dtype, group}]), `every` (k) and the loss reduction."""

    def __init__(self, run_dir: str | Path, header: dict[str, Any], overwrite: bool = False):
        self.root = trajectory_dir(run_dir)
        if inside(self.root, INDEX).exists() and not overwrite:
            raise StoreError(
                f"{self.root} already holds a recorded trajectory; pass overwrite=True "
                "to replace it, or record into another run directory"
            )
        if self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "steps").mkdir(parents=True)
        (self.root / "checkpoints").mkdir()
        self.index = {
            "format": TRAJECTORY_FORMAT,
            "version": TRAJECTORY_VERSION,
            **header,
            "checkpoints": [],
            "steps_files": [],
            "n_steps": 0,
            "complete": False,
        }
        write_json_atomic(self.root / INDEX, self.index)

    @classmethod
    def resume(
        cls, run_dir: str | Path, header: dict[str, Any], stored: Container, every: int | None
    ) -> tuple[TrajectoryWriter, Checkpoint, set] | None:
        """Reopen the trajectory of `run_dir` to continue it; None when there is none to continue
        (no index, or no checkpoint yet: nothing recorded is replayable).

        It continues from its last complete step: the last checkpoint c whose file and step files
        are intact and cover steps [0, c), and every data id of those steps is in `stored` (the
        ids the store holds: after a kill, rows of the last steps may be lost with the writer's
        buffer; training again from an earlier checkpoint logs them). The index is cut back to c
        (files beyond it are replaced as the training writes them again). `header` must match
        the recorded one (optimizer, parameter table, loss reduction; `every` when given), else a
        StoreError naming the fix. Returns (writer, checkpoint c, the ids of steps [0, c))."""
        root = trajectory_dir(run_dir)
        if not (root / INDEX).exists():
            return None
        try:
            traj = Trajectory(run_dir)
        except StoreError as e:
            if "no complete checkpoint" not in str(e):
                raise
            return None
        _check_header(traj, header, every)
        steps: list[dict[str, Any]] = []
        for first, count, crc in traj._steps_files:
            try:
                records = read_json(traj._checked(steps_name(first), crc))
            except StoreError:
                break  # a damaged step file: the trajectory ends before it
            if not isinstance(records, list) or len(records) != count:
                break
            steps.extend(records)
        step_ids = [
            {i for b in r.get("blocks", []) for i in b} if isinstance(r, dict) else None for r in steps
        ]
        complete = 0  # the steps [0, complete) that are intact and whose rows are all stored
        while complete < len(steps) and step_ids[complete] is not None:
            if not all(i in stored for i in step_ids[complete]):
                break
            complete += 1
        usable = [c for c in traj.checkpoint_steps if c <= complete]
        for c in reversed(usable):
            try:
                checkpoint = traj.checkpoint(c)
                break
            except StoreError:
                continue
        else:
            return None
        writer = cls.__new__(cls)
        writer.root = root
        old = read_json(root / INDEX)
        writer.index = {
            "format": TRAJECTORY_FORMAT,
            "version": TRAJECTORY_VERSION,
            **header,
            "every": traj.every,
            "checkpoints": [e for e in old["checkpoints"] if e["step"] <= c],
            "steps_files": [f for f in old["steps_files"] if f["first"] + f["count"] <= c],
            "n_steps": c,
            "complete": False,
        }
        write_json_atomic(root / INDEX, writer.index)
        return writer, checkpoint, {i for ids in step_ids[:c] for i in ids}

    def write_steps(self, first: int, records: list[dict[str, Any]]) -> None:
        """The records of steps first, first+1, ...: {"blocks": [[ids]...], "groups": [{hp}...]}."""
        if first != self.index["n_steps"]:
            raise StoreError(
                f"steps must be written in order: expected step {self.index['n_steps']}, got {first}"
            )
        path = inside(self.root, steps_name(first))
        text = json.dumps(records, separators=(",", ":"))
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.index["steps_files"].append({"first": first, "count": len(records), "crc32": file_crc32(path)})
        self.index["n_steps"] = first + len(records)

    def write_checkpoint(self, ckpt: Checkpoint) -> None:
        """Save a checkpoint (at the step count written so far) and commit the index."""
        if ckpt.step != self.index["n_steps"]:
            raise StoreError(f"checkpoint at step {ckpt.step} but {self.index['n_steps']} steps are written")
        tensors = {f"param/{n}": t.detach().cpu().contiguous() for n, t in ckpt.params.items()}
        for key, per_name in ckpt.state.items():
            tensors.update({f"state/{key}/{n}": t.detach().cpu().contiguous() for n, t in per_name.items()})
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": str(ckpt.step),
            "counts": json.dumps(ckpt.counts),
            "initialised": json.dumps(sorted(ckpt.initialised)),
        }
        path = inside(self.root, checkpoint_name(ckpt.step))
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        self.index["checkpoints"].append({"step": ckpt.step, "crc32": file_crc32(path)})
        write_json_atomic(self.root / INDEX, self.index)

    def close(self) -> None:
        self.index["complete"] = True
        write_json_atomic(self.root / INDEX, self.index)


def _check_header(traj: Trajectory, header: dict[str, Any], every: int | None) -> None:
    """A resumed recorder must record as the trajectory was recorded: else a clear error."""
    fix = "resume with the model and optimizer it was recorded with, or record into a new run directory"
    if header["optimizer"] != traj.optimizer:
        raise StoreError(
            f"the trajectory in {traj.root} was recorded with {traj.optimizer!r}, not "
            f"{header['optimizer']!r}: {fix}"
        )
    table = [(p["name"], list(p["shape"]), p["dtype"], p["group"]) for p in header["parameters"]]
    if table != [(p["name"], p["shape"], p["dtype"], p["group"]) for p in traj.parameters]:
        raise StoreError(
            f"the optimizer's parameters (names, shapes, dtypes, groups) differ from the ones the "
            f"trajectory in {traj.root} was recorded with: {fix}"
        )
    if header["reduction"] != traj.reduction:
        raise StoreError(
            f"the trajectory in {traj.root} was recorded with loss reduction {traj.reduction!r}, "
            f"not {header['reduction']!r}: {fix}"
        )
    if every is not None and int(every) != traj.every:
        raise StoreError(
            f"the trajectory in {traj.root} was recorded with a checkpoint every {traj.every} "
            f"steps: resume with trajectory_every={traj.every} (or leave it out)"
        )


def _int(value: Any, what: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreError(
            f"{path}: {what} must be a non-negative integer, got {value!r}; the index is damaged"
        )
    return value


class Trajectory:
    """A recorded trajectory opened for replay; everything read is checked before it is used.

    `checkpoint_steps` are the steps with a complete checkpoint; steps beyond the last one are
    not replayable (they follow a crash) and are left out of `n_steps`."""

    def __init__(self, run_dir: str | Path):
        self.root = trajectory_dir(run_dir)
        path = inside(self.root, INDEX)
        if not path.exists():
            raise StoreError(
                f"no recorded trajectory in {run_dir}: record one with "
                "run.watch(model, optimizer=opt) or logix.record_trajectory(...)"
            )
        index = read_tagged_json(path, TRAJECTORY_FORMAT, TRAJECTORY_VERSION, "trajectory index")
        self.optimizer = str(index.get("optimizer"))
        self.every = _int(index.get("every"), "every", path)
        self.reduction = str(index.get("reduction", "mean"))
        self.complete = bool(index.get("complete"))
        params = index.get("parameters")
        if not isinstance(params, list) or not params:
            raise StoreError(f"{path} has no parameter table")
        try:
            self.parameters = [
                {
                    "name": str(p["name"]),
                    "shape": [_int(s, "a shape", path) for s in p["shape"]],
                    "dtype": str(p["dtype"]),
                    "group": _int(p["group"], "a group", path),
                }
                for p in params
            ]
            self._checkpoint_crc = {}
            for c in index.get("checkpoints", []):
                self._checkpoint_crc[_int(c.get("step"), "a checkpoint step", path)] = str(c.get("crc32"))
            self.checkpoint_steps = sorted(self._checkpoint_crc)
            if not self.checkpoint_steps:
                raise StoreError(f"{self.root} has no complete checkpoint yet: nothing can be replayed")
            self._steps_files = []
            expected = 0
            for f in index.get("steps_files", []):
                first, count = _int(f.get("first"), "first", path), _int(f.get("count"), "count", path)
                if first != expected:
                    raise StoreError(f"{path}: the step files do not follow each other at step {first}")
                self._steps_files.append((first, count, str(f.get("crc32"))))
                expected = first + count
        except (KeyError, TypeError, AttributeError) as e:  # an entry of the wrong shape
            raise StoreError(
                f"{path} has a malformed entry ({type(e).__name__}: {e}); the index is damaged"
            ) from None
        self.n_steps = min(expected, self.checkpoint_steps[-1])

    def _checked(self, name: str, crc: str) -> Path:
        path = inside(self.root, name)
        if not path.exists():
            raise StoreError(f"{path} is listed in the trajectory index but missing")
        if file_crc32(path) != crc:
            raise StoreError(f"{path} does not match its checksum in the index; the file is damaged")
        return path

    def steps(self) -> list[dict[str, Any]]:
        """Every replayable step's record, in order: {"blocks": [[ids]...], "groups": [{hp}...]}."""
        out: list[dict[str, Any]] = []
        for first, count, crc in self._steps_files:
            if first >= self.n_steps:
                break
            path = self._checked(steps_name(first), crc)
            records = read_json(path)
            if not isinstance(records, list) or len(records) != count:
                raise StoreError(f"{path} should hold {count} step records")
            for r in records:
                if (
                    not isinstance(r, dict)
                    or not isinstance(r.get("blocks"), list)
                    or not isinstance(r.get("groups"), list)
                ):
                    raise StoreError(f"{path} holds a malformed step record")
            out.extend(records)
        return out[: self.n_steps]

    def checkpoint(self, step: int) -> Checkpoint:
        if step not in self._checkpoint_crc:
            raise StoreError(f"no checkpoint at step {step}; recorded checkpoints: {self.checkpoint_steps}")
        path = self._checked(checkpoint_name(step), self._checkpoint_crc[step])
        names = {p["name"] for p in self.parameters}
        params: dict[str, torch.Tensor] = {}
        state: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT or meta.get("step") != str(step):
                raise StoreError(f"{path} is not the trajectory checkpoint of step {step}")
            for key in f.keys():
                kind, _, rest = key.partition("/")
                if kind == "param" and rest in names:
                    params[rest] = f.get_tensor(key)
                elif kind == "state" and rest.partition("/")[2] in names:
                    skey, _, name = rest.partition("/")
                    state.setdefault(skey, {})[name] = f.get_tensor(key)
                else:
                    raise StoreError(f"{path} holds an unexpected tensor {key!r}")
            try:
                counts = {str(k): int(v) for k, v in json.loads(meta.get("counts", "{}")).items()}
                initialised = [str(n) for n in json.loads(meta.get("initialised", "[]"))]
            except (ValueError, TypeError, AttributeError, RecursionError) as e:
                raise StoreError(f"{path} has damaged metadata ({e!r})") from None
        for p in self.parameters:
            t = params.get(p["name"])
            if t is None or list(t.shape) != p["shape"]:
                raise StoreError(f"{path}: parameter {p['name']} is missing or has the wrong shape")
        return Checkpoint(step, params, state, counts, initialised)
