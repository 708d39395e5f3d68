"""Gradient clipping by global norm, as a differentiable function for the replay.

`torch.nn.utils.clip_grad_norm_(params, max_norm)` multiplies every gradient by
min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the 2-norm over all of them (the norm of the per-tensor
norms). The recorder notes max_norm on every step it scaled down (`capture/step_gradients.py`);
the replay applies the same formula to the replayed gradient, so the adjoint differentiates
through the coefficient too (its derivative is 0 where the clamp holds it at 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from logix.errors import StoreError

EPS = 1e-6  # clip_grad_norm_'s: max_norm / (total_norm + 1e-6)


def clip_by_global_norm(grads: tuple[torch.Tensor, ...], max_norm: float) -> tuple[torch.Tensor, ...]:
    """grads · min(1, max_norm / (‖grads‖₂ + 1e-6)), operation by operation as torch does it."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2) for g in grads]), 2)
    coefficient = torch.clamp(max_norm / (total + EPS), max=1.0)
    return tuple(g * coefficient for g in grads)


def recorded_max_norm(record: dict[str, Any], step: int) -> float | None:
    """The clip max_norm of one recorded step (None: not clipped), checked (read from disk)."""
    value = record.get("clip_max_norm")
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise StoreError(
            f"step {step} of the trajectory records clip_max_norm {value!r}, not a positive number; "
            "the step file is damaged"
        )
    return float(value)
