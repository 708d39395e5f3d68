"""Module selection and the hooks that observe a training step without changing it.

A forward hook projects each watched layer's input (x̃ [B, T, r_in]) and registers a tensor hook
on the layer's output; when backward reaches that output, the hook projects ∂ℓ/∂y and adds the
example's G̃ [B, r_out, r_in] to the step's accumulator (and, when K-FAC factors are collected,
x̃x̃ᵀ and g̃g̃ᵀ to the step's factor sums, see `factors.py`). Hooks return nothing, so parameter
gradients, outputs and optimizer steps are bit-identical with and without logix. Forward hooks
exist only inside a `with run(...)` block. Under autocast the hooks upcast what they receive and
project in float32 with autocast off (`full_precision`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from logix.capture.factors import KroneckerSums
from logix.capture.per_sample import (
    full_precision,
    output_grads,
    projected_gradient,
    projected_inputs,
)
from logix.capture.projection import ModuleProjection
from logix.errors import CaptureError


def shared_across_batch(name: str, module: nn.Module, x: torch.Tensor) -> bool:
    """An Embedding called without a batch axis (position embeddings, `pos_emb(arange(T))`) is
    shared by every example: nothing to attribute per example. True (with a notice, once per
    module) for such a call; its columns in the rows stay zero."""
    if not (isinstance(module, nn.Embedding) and x.ndim == 1):
        return False
    if not getattr(module, "_logix_shared_noticed", False):
        module._logix_shared_noticed = True
        warnings.warn(f"module {name!r} is an Embedding called without a batch axis (e.g. position "
                      "embeddings on arange(T)): shared by every example, it is skipped (its columns "
                      f"stay zero); add {name!r} to capture.exclude to drop them", stacklevel=2)
    return True



def check_gradient_reached(state: "StepState") -> None:
    """A block whose backward reached no watched module is a mistake in the loop: say which."""
    if not state.written:
        raise CaptureError(
            "no gradient reached any watched module inside `with run(data_id=...)`: call "
            "loss.backward() inside the block (with gradients enabled)")


def check_batch_mask(mask: torch.Tensor | None, batch_size: int) -> None:
    """A padding mask given with a block must be [batch, seq] (1 = real position)."""
    if mask is not None and (mask.ndim != 2 or mask.shape[0] != batch_size):
        raise ValueError(f"mask must be [batch={batch_size}, seq], got {tuple(mask.shape)}")


def position_mask(mask: torch.Tensor | None, module: nn.Module, name: str,
                  values: torch.Tensor) -> torch.Tensor | None:
    """The [B, T] padding mask that applies to a layer's per-position `values` [B, T, ...], in
    their dtype and device; None where it does not apply (no mask, Conv2d, one position)."""
    if mask is None or isinstance(module, nn.Conv2d) or values.shape[1] == 1:
        return None
    if values.shape[1] != mask.shape[1]:
        raise CaptureError(
            f"mask has {mask.shape[1]} positions but module {name!r} sees "
            f"{values.shape[1]}; pass a [batch, seq] mask matching the sequence length"
        )
    return mask.to(device=values.device, dtype=values.dtype)


@dataclass
class StepState:
    """What one `with run(data_id=...)` block collects: the rows [B, D] of its examples, each
    module's G̃ [B, r_out, r_in] summed in place into its own column block."""

    batch_size: int
    width: int
    grad_scale: float
    mask: torch.Tensor | None
    attribution_only: bool
    destination: torch.Tensor | None = None  # preferred CPU rows buffer (the store's shard buffer)
    outputs: list[torch.Tensor] | None = None  # if a list: each watched output, for autograd.grad
    factors: KroneckerSums | None = None  # the step's K-FAC factor sums, when they are collected
    rows_wanted: bool = True  # False in a curvature-only pass: no G̃ is formed
    tokens: Any = None  # a capture.tokens.TokenRecorder in a per-token block: factors, no rows
    factor_inputs: bool = True  # False: add only g̃g̃ᵀ (a repeated backward of one forward pass)
    rows: torch.Tensor | None = None
    written: set[int] = field(default_factory=set)
    open: bool = True

    def block(self, capture: "ModuleCapture", like: torch.Tensor) -> torch.Tensor:
        """The [B, r_out, r_in] view of `capture`'s columns in the step's rows."""
        if self.rows is None:
            if self.destination is not None and self.destination.device == like.device:
                self.rows = self.destination
            else:
                self.rows = torch.empty(self.batch_size, self.width, device=like.device)
        cols = self.rows[:, capture.offset:capture.offset + capture.r_out * capture.r_in]
        return cols.view(self.batch_size, capture.r_out, capture.r_in)


class ModuleCapture:
    """The hooks of one watched module."""

    def __init__(self, index: int, name: str, module: nn.Module, projection: ModuleProjection,
                 bias: bool, offset: int):
        self.index = index
        self.name = name
        self.module = module
        self.projection = projection
        self.bias = bias
        self.offset = offset
        self.r_in = projection.p_in.rank
        self.r_out = projection.p_out.rank
        self.is_conv = isinstance(module, nn.Conv2d)

    def attach(self, step: StepState) -> torch.utils.hooks.RemovableHandle:
        return self.module.register_forward_hook(partial(self._forward, step))

    def _forward(self, step: StepState, module: nn.Module, inputs: tuple, output: torch.Tensor):
        if not torch.is_grad_enabled():
            return None  # evaluation under no_grad inside the block: nothing to attribute
        if shared_across_batch(self.name, module, inputs[0]):
            return None
        replaced = False
        if not output.requires_grad:
            if not step.attribution_only:
                return None  # frozen input side of the graph: no gradient will reach this layer
            # Parameters are frozen in attribution-only mode: make the output a leaf so that
            # backward reaches it (and stops there) without any weight-gradient work.
            output = output.detach().requires_grad_(True)
            replaced = True
        x = inputs[0]
        if x.shape[0] != step.batch_size:
            raise CaptureError(
                f"module {self.name!r} saw a batch of {x.shape[0]} examples but data_id has "
                f"{step.batch_size} ids; pass one id per example (batch dimension first)"
            )
        with torch.no_grad(), full_precision(x.device):
            x_proj = projected_inputs(module, x.detach(), self.projection.p_in, self.bias)
            x_proj = self._apply_mask(step, x_proj)
            if step.grad_scale != 1.0:  # undo a mean-reduced loss's 1/B on the smaller side
                x_proj = x_proj * step.grad_scale
        output.register_hook(partial(self._backward, step, x_proj))
        if step.outputs is not None:
            step.outputs.append(output)
        return output if replaced else None

    def _apply_mask(self, step: StepState, x_proj: torch.Tensor) -> torch.Tensor:
        mask = position_mask(step.mask, self.module, self.name, x_proj)
        return x_proj if mask is None else x_proj * mask.unsqueeze(-1)

    def _backward(self, step: StepState, x_proj: torch.Tensor, grad: torch.Tensor) -> None:
        if not step.open:
            raise CaptureError(
                f"backward reached {self.name!r} after its `with run(data_id=...)` block had "
                "exited; call loss.backward() inside the block"
            )
        with torch.no_grad(), full_precision(grad.device):
            g = output_grads(self.module, grad.detach()).float()
            g_proj = self.projection.p_out.apply(g)
            if step.tokens is not None:  # per-token block: keep the factors instead of summing
                step.tokens.add(self, x_proj, g_proj)
                return None
            if step.factors is not None:
                mask = position_mask(step.mask, self.module, self.name, g_proj)
                step.factors.add_positions(self.name, x_proj, g_proj, mask, step.grad_scale,
                                           inputs=step.factor_inputs)
            if step.rows_wanted:
                block = step.block(self, g_proj)
                projected_gradient(x_proj, g_proj, out=block, accumulate=self.index in step.written)
            step.written.add(self.index)
        return None
