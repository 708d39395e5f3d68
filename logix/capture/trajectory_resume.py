"""A resumed trajectory's training state: the recorded checkpoint it continues from, loaded
into the model and optimizer (`restore_state`), or checked against what the user restored
(`check_state`) before the first resumed block, so that no step is recorded (and no row logged)
from a state the recorded steps did not lead to."""

from __future__ import annotations

import torch

from logix.errors import CaptureError
from logix.store.trajectory import Checkpoint

Params = list[tuple[str, torch.Tensor, int]]  # (name, parameter, group) in optimizer order


def _step_count(value: float) -> torch.Tensor:
    """Adam's `state['step']` as torch.optim keeps it (a scalar tensor of its scalar dtype)."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(float(value), dtype=dtype)


def restore_state(
    params: Params, optimizer: torch.optim.Optimizer, keys: tuple[str, ...], ckpt: Checkpoint
) -> None:
    """Load checkpoint `ckpt` (the state before step `ckpt.step`) into the parameters and the
    optimizer's state (its tensors `keys`, e.g. 'momentum_buffer'), in place."""
    initialised = set(ckpt.initialised)
    with torch.no_grad():
        for name, p, _ in params:
            p.copy_(ckpt.params[name].to(device=p.device, dtype=p.dtype))
            optimizer.state.pop(p, None)
            if name not in initialised:
                continue
            state: dict = {}
            for key in keys:
                if name in ckpt.state.get(key, {}):
                    state[key] = ckpt.state[key][name].to(device=p.device, dtype=p.dtype).clone()
            if name in ckpt.counts:
                state["step"] = _step_count(ckpt.counts[name])
            optimizer.state[p] = state


def check_state(
    params: Params, optimizer: torch.optim.Optimizer, keys: tuple[str, ...], ckpt: Checkpoint
) -> None:
    """A CaptureError naming the fix unless the parameters and optimizer state equal `ckpt`."""
    initialised = set(ckpt.initialised)
    for name, p, _ in params:
        state = optimizer.state.get(p, {})
        if not torch.equal(p.detach().cpu(), ckpt.params[name].to(p.dtype)):
            what = f"parameter {name}"
        elif (name in initialised) != any(state.get(k) is not None for k in keys):
            what = f"whether the optimizer state of {name} exists"
        elif any(
            name in ckpt.state.get(k, {})
            and not torch.equal(state[k].detach().cpu(), ckpt.state[k][name].to(state[k].dtype))
            for k in keys
        ):
            what = f"the optimizer state of {name}"
        elif name in ckpt.counts and int(state.get("step", -1)) != ckpt.counts[name]:
            what = f"the optimizer's step count of {name}"
        else:
            continue
        raise CaptureError(
            f"the resumed training does not start from the state the trajectory recorded before "
            f"step {ckpt.step}: {what} differs from its checkpoint. Call run.restore_trajectory() "
            f"after run.watch(...) (it loads that checkpoint into the model and optimizer), or "
            f"load your own checkpoint of step {ckpt.step}, then train from step {ckpt.step} "
            "(run.trajectory_step) with the learning rate of that step"
        )
