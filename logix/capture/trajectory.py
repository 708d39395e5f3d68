"""Recording the training trajectory that `logix.unroll` replays: which data ids went into each
optimizer step, the hyperparameters each step used, and every k steps a checkpoint.

The recorder observes; it never changes the training: optimizer step hooks read the learning
rate as the scheduler set it and copy parameters and optimizer state at checkpoints. Data ids
arrive per block (`add_block`, called by the Run's block context or by `recorder(data_id=...)`),
so gradient accumulation over several blocks per step is recorded as it happened.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logix.capture.step_gradients import StepGradients, check_dtypes
from logix.capture.trajectory_resume import check_state, restore_state
from logix.errors import CaptureError, ConfigError
from logix.store.trajectory import Checkpoint, TrajectoryWriter
from logix.store.writer import batch_ids
from logix.vocabulary import LOSS_REDUCTIONS, check_choice

# Hyperparameters each kind's replay reads from a parameter group (all plain numbers or bools).
HYPERPARAMETERS = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    "adam": ("lr", "betas", "eps", "weight_decay"),
    "adamw": ("lr", "betas", "eps", "weight_decay"),
}
STATE_KEYS = {
    "sgd": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """'sgd', 'adam' or 'adamw' for the torch.optim classes a replay reproduces; else a clear error."""
    kind = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}.get(type(optimizer))
    if kind is None:
        raise ConfigError(
            f"cannot record a trajectory for {type(optimizer).__name__}: replay reproduces "
            "torch.optim.SGD, Adam and AdamW exactly; use one of those"
        )
    for group in optimizer.param_groups:
        for flag in ("maximize", "amsgrad", "differentiable", "fused"):
            if group.get(flag):
                raise ConfigError(
                    f"cannot record {type(optimizer).__name__} with {flag}=True: its replay "
                    f"is not implemented; use {flag}=False"
                )
        if kind == "adam" and group.get("decoupled_weight_decay"):
            kind = "adamw"  # Adam(decoupled_weight_decay=True) is AdamW
    return kind


def group_hyperparameters(kind: str, group: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of one parameter group as JSON numbers (lr may be a tensor)."""
    out: dict[str, Any] = {}
    for key in HYPERPARAMETERS[kind]:
        value = group[key]
        if key == "betas":
            out[key] = [float(b) for b in value]
        elif key == "nesterov":
            out[key] = bool(value)
        else:
            out[key] = float(value)
    return out


def default_every(total_steps: int | None) -> int:
    """k, the checkpoint interval: about √T balances stored checkpoints against recomputation."""
    return max(1, round(math.sqrt(total_steps))) if total_steps else 32


def _random_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose training-mode forward is random or keeps running state a replay cannot redo."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            out.append(m)
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            out.append(m)
    return out


class TrajectoryRecorder:
    """Records one training run of `model` with `optimizer` into RUN_DIR/trajectory.

    every: checkpoint interval k (default √total_steps, or 32). reduction: how the loop reduces
    the per-example losses of a block ('mean' or 'sum'), which the replay repeats. Call
    `close()` (or use it as a context manager) after the last step to write the final checkpoint.
    resume: the data ids the store holds; the recorded trajectory (if any) then continues from
    its last complete step (`TrajectoryWriter.resume`), `step` is that step and the first block
    checks that the model and optimizer are in its recorded state (`restore()` loads it).
    """

    def __init__(
        self,
        run_dir: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        every: int | None = None,
        total_steps: int | None = None,
        reduction: str = "mean",
        overwrite: bool = False,
        resume: set | None = None,
    ):
        self.kind = optimizer_kind(optimizer)
        check_choice(reduction, LOSS_REDUCTIONS, "loss reduction")
        self.every = int(every) if every is not None else default_every(total_steps)
        if self.every < 1:
            raise ConfigError(f"every must be at least 1 step, got {every}")
        self.model, self.optimizer = model, optimizer
        name_of = {id(p): n for n, p in model.named_parameters()}
        self._params: list[tuple[str, torch.Tensor, int]] = []
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in name_of:
                    raise CaptureError(
                        "the optimizer holds a parameter that is not one of the model's: pass "
                        "the model whose parameters the optimizer updates"
                    )
                self._params.append((name_of[id(p)], p, g))
        check_dtypes(self._params)
        self._random = _random_modules(model)
        header = {
            "optimizer": self.kind,
            "every": self.every,
            "reduction": reduction,
            "parameters": [
                {"name": n, "shape": list(p.shape), "group": g, "dtype": str(p.dtype).removeprefix("torch.")}
                for n, p, g in self._params
            ],
        }
        resumed = None if resume is None else TrajectoryWriter.resume(run_dir, header, resume, every)
        self.resumed_from: Checkpoint | None = None  # checked against the first resumed block
        self.recorded_ids: set = set()  # ids of the steps recorded before this process
        self.step = 0
        if resumed is None:
            self._writer = TrajectoryWriter(run_dir, header, overwrite=overwrite or resume is not None)
        else:
            self._writer, self.resumed_from, self.recorded_ids = resumed
            self.every, self.step = self._writer.index["every"], self.resumed_from.step
        self._blocks: list[list] = []
        self._records: list[dict[str, Any]] = []
        self._first = self.step  # the first step of the records not yet written
        self._closed = False
        self._gradients = StepGradients(model, self._params)  # clipping, and what replay refuses
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def add_block(self, data_id: Any) -> None:
        """The data ids of one forward/backward block that feeds the next optimizer step."""
        if self._closed:
            raise CaptureError("this trajectory recorder is closed")
        if self.resumed_from is not None:  # before any row of the resumed training is logged
            check_state(self._params, self.optimizer, STATE_KEYS[self.kind], self.resumed_from)
            self.resumed_from = None
        self._blocks.append(batch_ids(data_id))

    def restore(self) -> int:
        """Load the checkpoint a resumed trajectory continues from into the model and optimizer;
        returns its step, the step to train from."""
        if self.resumed_from is None:
            if self.step == 0 and not self._records and not self._blocks:
                return 0  # a new recording: the model and optimizer start as they are
            raise CaptureError("restore() is for a resumed trajectory before its first block")
        restore_state(self._params, self.optimizer, STATE_KEYS[self.kind], self.resumed_from)
        return self.step

    @contextlib.contextmanager
    def __call__(self, data_id: Any) -> Iterator[None]:
        """`with recorder(data_id=ids):` around a block's forward and backward (no rows logged)."""
        self.add_block(data_id)
        yield

    def _check_step(self) -> None:
        if not self._blocks:
            raise CaptureError(
                "optimizer.step() was called with no data ids since the previous step: wrap "
                "each forward/backward in `with run(data_id=ids):` (or recorder(data_id=ids))"
            )
        for m in self._random:
            if m.training:
                raise CaptureError(
                    f"{type(m).__name__} in training mode makes the step random or stateful, "
                    "which a replay cannot reproduce: set its p=0 / use eval mode, or do not "
                    "record this training"
                )
        for name, p, _ in self._params:
            if p.grad is None:
                raise CaptureError(
                    f"parameter {name} has no gradient at step {self.step}: a replay needs "
                    "every parameter of the optimizer in every step (leave frozen ones out)"
                )

    def _before_step(self, optimizer, args, kwargs) -> None:
        self._check_step()
        max_norm = self._gradients.check(self.step)
        if self.step % self.every == 0:
            self._commit()
        record = {
            "blocks": self._blocks,
            "groups": [group_hyperparameters(self.kind, g) for g in optimizer.param_groups],
        }
        if max_norm is not None:  # clip_grad_norm_ scaled this step's gradients down
            record["clip_max_norm"] = max_norm
        self._records.append(record)
        self._blocks = []

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.step += 1

    def _commit(self) -> None:
        """The steps since the last checkpoint, then a checkpoint of the state before this step."""
        done = self._writer.index["checkpoints"]
        if not self._records and done and done[-1]["step"] == self.step:
            return  # a resumed trajectory's checkpoint: already on disk
        if self._records:
            self._writer.write_steps(self._first, self._records)
            self._first += len(self._records)
            self._records = []
        params, counts, initialised = {}, {}, []
        state: dict[str, dict[str, torch.Tensor]] = {}
        for name, p, _ in self._params:
            params[name] = p.detach().to("cpu", copy=True)
            s = self.optimizer.state.get(p, {})
            for key in STATE_KEYS[self.kind]:
                if s.get(key) is not None:
                    state.setdefault(key, {})[name] = s[key].detach().to("cpu", copy=True)
            if "step" in s:
                counts[name] = int(s["step"])
            if any(s.get(key) is not None for key in STATE_KEYS[self.kind]):
                initialised.append(name)
        self._writer.write_checkpoint(Checkpoint(self.step, params, state, counts, initialised))

    def close(self) -> None:
        """Write the remaining steps and the final checkpoint; remove the hooks."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        self._gradients.remove()
        if self._blocks:
            raise CaptureError(
                f"{len(self._blocks)} block(s) of data ids were recorded after the last "
                "optimizer.step(); call optimizer.step() after them or drop them"
            )
        done = self._writer.index["checkpoints"]
        if not done or self.step > done[-1]["step"]:
            self._commit()
        self._writer.close()

    def __enter__(self) -> TrajectoryRecorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave the trajectory as it is: it replays up to its last checkpoint
            self._closed = True
            for h in self._hooks:
                h.remove()
            self._gradients.remove()


def record_trajectory(
    run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any
) -> TrajectoryRecorder:
    """A recording-only run: record the trajectory of `model` under `optimizer`, no rows logged.

    with logix.record_trajectory("runs/x", model, opt, total_steps=T) as rec:
        for ids, x, y in loader:
            with rec(data_id=ids):
                F.cross_entropy(model(x), y).backward()
            opt.step(); opt.zero_grad()
    """
    return TrajectoryRecorder(run_dir, model, optimizer, **kwargs)
