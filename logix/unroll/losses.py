"""The user's per-example loss as a function of a parameter tuple, for torch.func transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from logix.errors import CaptureError, StoreError

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class _Bound(nn.Module):
    """Holds the model so that `functional_call` can swap its parameters under a loss_fn that
    takes the model itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: LossFn, batch: Any) -> torch.Tensor:
        return fn(self.model, batch)


class ParametrisedLoss:
    """per_example(params, fn, batch) -> [B]: fn(model, batch) with the model's recorded
    parameters replaced by `params` (a tuple in the trajectory's parameter order)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.bound = _Bound(model)
        self.keys = [f"model.{n}" for n in names]

    def per_example(self, params: tuple[torch.Tensor, ...], fn: LossFn, batch: Any) -> torch.Tensor:
        out = functional_call(self.bound, dict(zip(self.keys, params)), (fn, batch))
        if not isinstance(out, torch.Tensor) or out.ndim != 1:
            raise CaptureError(
                "loss_fn(model, batch) must return the per-example losses, a 1-D tensor "
                f"[B]; got {getattr(out, 'shape', type(out).__name__)} (use reduction='none')"
            )
        return out

    def step_loss(
        self,
        params: tuple[torch.Tensor, ...],
        weights: tuple[torch.Tensor, ...],
        fn: LossFn,
        batches: list[Any],
        reduction: str,
    ) -> torch.Tensor:
        """The loss one optimizer step differentiated: Σ over its blocks of the block's reduced,
        weighted per-example losses (weights ε = 1 reproduce the recorded step)."""
        total = None
        for w, batch in zip(weights, batches):
            losses = self.per_example(params, fn, batch)
            if losses.shape != w.shape:
                raise CaptureError(
                    f"examples(ids) gave a batch whose loss has {losses.shape[0]} entries "
                    f"for {w.shape[0]} recorded ids: it must return exactly those examples"
                )
            block = (w * losses).sum()
            block = block / w.shape[0] if reduction == "mean" else block
            total = block if total is None else total + block
        return total


def check_model(model: nn.Module, parameters: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The model's parameters in the trajectory's order, after checking names, shapes and dtypes
    against the recorded parameter table; a clear error for any difference."""
    own = dict(model.named_parameters())
    out = []
    for p in parameters:
        t = own.get(p["name"])
        if t is None:
            raise StoreError(
                f"the model has no parameter {p['name']!r}, which the recorded training "
                "updated: replay with the model the trajectory was recorded with"
            )
        dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != p["shape"] or dtype != p["dtype"]:
            raise StoreError(
                f"parameter {p['name']} is {dtype} {list(t.shape)} but was recorded as "
                f"{p['dtype']} {p['shape']}: replay with the recorded model"
            )
        out.append(t)
    return out
