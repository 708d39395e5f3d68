"""What a recorded training loop does to its gradients between backward and `optimizer.step()`.

A replay (`logix.unroll`) recomputes each step's gradient from the step's examples, so whatever
the loop does to `.grad` before the step must be known. The recorder compares, for every
parameter, the norm of the gradient backward left (read by a post-accumulate-grad hook after
every backward) with the norm at the step (the optimizer's pre-step hook):

- equal everywhere: a plain step;
- one factor c < 1 over all parameters: gradient clipping by global norm
  (`torch.nn.utils.clip_grad_norm_`, c = max_norm / (‖g‖ + 1e-6)), recorded with its max_norm
  and replayed exactly (`unroll/clipping.py`);
- a power of two: a GradScaler's unscale (mixed precision), refused;
- anything else (`clip_grad_value_`, clipping a subset of the parameters, edits by hand):
  refused, as are non-finite gradients (a GradScaler skipping an overflowed step), autocast
  around a recorded forward and weights that are not float32 / float64.

Refusals are errors at record time naming what is supported, never a checkpoint mismatch found
at replay. The hooks only read gradients; training is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from logix.errors import CaptureError, ConfigError

REPLAYED_DTYPES = (torch.float32, torch.float64)
SUPPORTED = (
    "replay supports plain float32/float64 training and gradient clipping with "
    "torch.nn.utils.clip_grad_norm_(all of the optimizer's parameters, max_norm) (norm_type 2)"
)
SAME = 1e-6  # relative: a gradient left as backward produced it (clipping multiplies by 1.0 then)
UNIFORM = 1e-5  # relative spread of the per-parameter factors of one global clip


def check_dtypes(params: list[tuple[str, torch.Tensor, int]]) -> None:
    """Refuse weights a replay cannot reproduce (bf16 / fp16 rounding of every update)."""
    for name, p, _ in params:
        if p.dtype not in REPLAYED_DTYPES:
            raise ConfigError(
                f"cannot record a trajectory of {str(p.dtype).removeprefix('torch.')} weights "
                f"(parameter {name}): {SUPPORTED}; record the model in float32 (mixed precision "
                "with autocast / GradScaler is not replayed either), or log rows without recording "
                "(run.watch(model) without optimizer=)"
            )


def infer_max_norm(coefficient: float, total_norm: float) -> float:
    """max_norm from an observed clip coefficient c = max_norm / (total + 1e-6), to 6 digits
    (users pick round numbers; a 1e-7 error of c would otherwise move the replay off)."""
    return float(f"{coefficient * (total_norm + 1e-6):.6g}")


class StepGradients:
    """The hooks that watch a recorded loop's gradients; `check(step)` at each pre-step returns
    the clip max_norm of that step (None: not clipped) or raises."""

    def __init__(self, model: nn.Module, params: list[tuple[str, torch.Tensor, int]]):
        self.params = params
        self.max_norm: float | None = None  # of the first clipped step (later ones must agree)
        self._backward: dict[int, torch.Tensor] = {}  # id(param) -> norm of .grad after backward
        self._finite: torch.Tensor | None = None  # all backward gradients finite since the last step
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._after_backward)
            for _, p, _ in params
            if p.requires_grad
        ]
        self._hooks.append(model.register_forward_pre_hook(self._before_forward))
        self._device_type = params[0][1].device.type if params else "cpu"

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and torch.is_autocast_enabled(self._device_type):
            raise ConfigError(
                "autocast (mixed precision) around a recorded training forward: its rounding "
                f"cannot be replayed exactly; {SUPPORTED}. Record the training in float32, or "
                "log rows under autocast without recording (run.watch(model) without optimizer=)"
            )

    def _after_backward(self, p: torch.Tensor) -> None:
        norm = torch.linalg.vector_norm(p.grad.detach())
        self._backward[id(p)] = norm
        finite = torch.isfinite(norm)
        self._finite = finite if self._finite is None else self._finite & finite

    def check(self, step: int) -> float | None:
        """Compare the gradients at this step with what backward left; see the module doc."""
        finite, self._finite = self._finite, None
        left = [self._backward.pop(id(p), None) for _, p, _ in self.params]
        self._backward.clear()
        device = self.params[0][1].device if self.params else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.float64, device=device)
        now = [
            zero if p.grad is None else torch.linalg.vector_norm(p.grad.detach()).to(zero)
            for _, p, _ in self.params
        ]
        missing = zero - 1.0
        pairs = [torch.stack([missing if b is None else b.to(zero), a]) for b, a in zip(left, now)]
        values = torch.stack(pairs).tolist()  # one synchronisation per step
        if finite is not None and not bool(finite):
            raise CaptureError(
                f"a backward before step {step} produced non-finite gradients (inf/NaN), as under "
                f"fp16 loss scaling, whose GradScaler then skips the step: {SUPPORTED}"
            )
        ratios, total = [], 0.0
        for (name, _, _), (before, after) in zip(self.params, values):
            if before < 0:  # no backward reached it since the last step: its .grad was not made here
                if after != 0:
                    raise CaptureError(
                        f"parameter {name}'s gradient at step {step} was not produced by a backward "
                        "since the previous step (set by hand, or kept from an earlier step without "
                        "optimizer.zero_grad()): a replay recomputes every gradient from the step's "
                        "examples"
                    )
                continue
            total += before * before
            if before == 0:
                if after != 0:
                    raise self._changed(step, name)
                continue
            ratios.append((after / before, name))
        if not ratios or all(abs(r - 1) <= SAME for r, _ in ratios):
            # Barely clipped (c within SAME of 1) still differentiates through the clip: known
            # only once a max_norm is, from an earlier step.
            if self.max_norm is not None and 1 - SAME <= self.max_norm / (math.sqrt(total) + 1e-6) < 1:
                return self.max_norm
            return None
        c = sum(r for r, _ in ratios) / len(ratios)
        for r, name in ratios:
            if abs(r - c) > UNIFORM * c:
                raise self._changed(step, name)
        if c > 1:
            raise self._changed(step, ratios[0][1])
        if math.frexp(c)[0] == 0.5:
            raise CaptureError(
                f"the gradients at step {step} are exactly 2^{math.frexp(c)[1] - 1} times those "
                f"backward produced: a GradScaler's unscale (mixed precision), or gradients divided "
                f"by hand. {SUPPORTED}; record the training without loss scaling"
            )
        max_norm = infer_max_norm(c, math.sqrt(total))
        if self.max_norm is None:
            self.max_norm = max_norm
        elif abs(max_norm - self.max_norm) > 1e-4 * self.max_norm:
            raise CaptureError(
                f"step {step} clipped the gradients to a global norm of {max_norm:.6g}, an earlier "
                f"step to {self.max_norm:.6g}: {SUPPORTED}, with one max_norm (a norm_type other "
                "than 2 gives such changes too)"
            )
        return self.max_norm

    @staticmethod
    def _changed(step: int, name: str) -> CaptureError:
        return CaptureError(
            f"the gradients at optimizer.step() (step {step}) differ from those backward produced, "
            f"and not by one factor below 1 over all parameters (parameter {name}): "
            "clip_grad_value_, clipping only some parameters, or gradients changed by hand. "
            f"{SUPPORTED}"
        )
