"""The one capture path: hooks that observe a training step without changing it, and feed sinks.

A forward hook on each watched layer projects its input (x̃ [B, T, r_in], padded positions zeroed,
a mean-reduced loss's 1/B undone) and registers a tensor hook on the layer's output; when
backward reaches that output, the tensor hook projects ∂ℓ/∂y (g̃ [B, T, r_out]) and hands both to
every sink of the block: rows (`rows.RowSink`), K-FAC factor sums (`factors.FactorSink`),
per-token factors (`tokens.TokenSink`), covariances for PCA (`pca.CovarianceSink`, which asks for
the unprojected x and g instead: `Sink.projected = False`). A new statistic is a new sink.

Hooks return nothing (but a leaf output in attribution-only mode), so parameter gradients,
outputs and optimizer steps are bit-identical with and without logix. Forward hooks exist only
inside a block. Under autocast the hooks upcast what they receive and project in float32 with
autocast off (`full_precision`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from logix.capture.per_sample import CONVOLUTIONS, full_precision, projected_inputs, projected_output_grads
from logix.capture.projection import ModuleProjection
from logix.errors import CaptureError
from logix.notices import warn


def shared_across_batch(
    name: str, module: nn.Module, x: torch.Tensor, block: CaptureBlock | None = None
) -> bool:
    """An Embedding called without a batch axis (position embeddings, `pos_emb(arange(T))`) is
    shared by every example: nothing to attribute per example. True (with a notice, once per
    module) for such a call; its columns in the rows stay zero."""
    if not (isinstance(module, nn.Embedding) and x.ndim == 1):
        return False
    if block is not None:
        block.fired.add(name)  # said out loud below: not an unfired module
    if not getattr(module, "_logix_shared_noticed", False):
        module._logix_shared_noticed = True
        warn(
            f"module {name!r} is an Embedding called without a batch axis (e.g. position "
            "embeddings on arange(T)): shared by every example, it is skipped (its columns "
            f"stay zero); add {name!r} to capture.exclude to drop them",
        )
    return True


def check_gradient_reached(reached: set[int]) -> None:
    """A block whose backward reached no watched module is a mistake in the loop: say which."""
    if not reached:
        raise CaptureError(
            "no gradient reached any watched module inside `with run(data_id=...)`: call "
            "loss.backward() inside the block (with gradients enabled)"
        )


def check_batch_mask(mask: torch.Tensor | None, batch_size: int) -> None:
    """A padding mask given with a block must be [batch, seq] of 0 (padded) and 1 (real)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != batch_size:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CaptureError(f"mask must be a tensor [batch={batch_size}, seq], got {shape}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)][0].item()
        raise CaptureError(
            f"mask holds {bad!r}: a padding mask marks real (1) and padded (0) positions and "
            "nothing else; to weight examples or tokens, weight their terms in the loss instead"
        )


def mask_applies(mask: torch.Tensor, module: nn.Module, positions: int) -> bool:
    """Whether a [B, T] padding mask applies to a layer that sees `positions` positions per
    example: not to Conv1d / Conv2d (their positions are output steps and pixels) nor to a layer
    without a sequence axis (one position, e.g. a head on pooled features), unless the mask has
    one position too."""
    return not isinstance(module, CONVOLUTIONS) and (positions != 1 or mask.shape[1] == 1)


def check_mask_used(block: CaptureBlock) -> None:
    """A mask that applied to no watched module is a mistake (e.g. a mask given to an MLP):
    say which modules saw it and why it did not apply."""
    if block.mask is None or block.mask_used or not block.mask_skipped:
        return
    seen = ", ".join(f"{n!r} (input {list(s)})" for n, s in list(block.mask_skipped.items())[:5])
    raise CaptureError(
        f"a padding mask [batch, seq={block.mask.shape[1]}] was given, but no watched module has a "
        f"sequence axis it could apply to: {seen}. A mask marks padded positions of sequence "
        "inputs [batch, seq, ...] (Conv2d pixels are not covered); drop mask=... for this model "
        "(to leave an example out, leave it out of the batch)"
    )


def position_mask(
    mask: torch.Tensor | None, module: nn.Module, name: str, values: torch.Tensor
) -> torch.Tensor | None:
    """The [B, T] padding mask that applies to a layer's per-position `values` [B, T, ...], in
    their dtype and device; None where it does not apply (no mask, see `mask_applies`)."""
    if mask is None or not mask_applies(mask, module, values.shape[1]):
        return None
    if values.shape[1] != mask.shape[1]:
        raise CaptureError(
            f"mask has {mask.shape[1]} positions but module {name!r} sees "
            f"{values.shape[1]}; pass a [batch, seq] mask matching the sequence length"
        )
    return mask.to(device=values.device, dtype=values.dtype)


def _positions(module: nn.Module, x: torch.Tensor) -> int:
    """Positions per example of a layer's input x (as `projected_inputs` arranges them)."""
    if isinstance(module, nn.Embedding):
        return x[0].numel()
    return x[0].numel() // x.shape[-1] if x.ndim > 1 else 1


class Sink:
    """Receives what the hooks capture in one block. `projected`: whether it reads x̃ and g̃
    (else the hooks skip projecting for it and it reads the raw input and gradient)."""

    projected = True

    def forward(self, capture: ModuleCapture, block: CaptureBlock, x: torch.Tensor) -> None:
        """Once per forward call of a watched module: x is its raw (detached) input."""

    def backward(
        self,
        capture: ModuleCapture,
        block: CaptureBlock,
        call: ForwardCall,
        g_proj: torch.Tensor | None,
        grad: torch.Tensor,
    ) -> None:
        """Once per backward reaching that call: g̃ [B, T, r_out] float32 (None when no sink of
        the block is `projected`) and the raw output gradient ∂ℓ/∂y."""


@dataclass
class ForwardCall:
    """One forward call of a watched module: its x̃ [B, T, r_in] and how many backward passes
    have reached its output so far."""

    x_proj: torch.Tensor | None
    backwards: int = 0


@dataclass
class CaptureBlock:
    """What the hooks of one block share: batch size (None: not checked), the loss scale undone
    on every example (B for a mean-reduced loss), the padding mask [B, T], the sinks, and which
    modules backward reached. `outputs` (a list) collects each watched output, for
    `torch.autograd.grad` passes; `attribution_only` turns frozen layers' outputs into leaves;
    `mask_used` / `mask_skipped` say where the mask applied (checked by `check_mask_used`)."""

    batch_size: int | None
    sinks: list[Sink]
    grad_scale: float = 1.0
    mask: torch.Tensor | None = None
    attribution_only: bool = False
    outputs: list[torch.Tensor] | None = None
    reached: set[int] = field(default_factory=set)
    open: bool = True
    mask_used: bool = False  # the mask applied to some watched module
    mask_skipped: dict[str, tuple] = field(default_factory=dict)  # modules it did not apply to
    uncapturable: list[str] = field(default_factory=list)  # uses of watched weights (functional_uses.py)
    audit: object | None = None  # the FunctionalUses auditing this block (the first of a run)
    # Watched modules whose parameters' use this block accounted for by another path than their
    # own forward hook (a functional interception, a notice that says why it is skipped): the
    # first block's unfired-module check (`fired.check_fired`) counts them as fired.
    fired: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.projected = any(s.projected for s in self.sinks)


class ModuleCapture:
    """The hooks of one watched module. `projection` may be None when only unprojected sinks
    are used (the PCA statistics pass before projections exist)."""

    def __init__(
        self,
        index: int,
        name: str,
        module: nn.Module,
        projection: ModuleProjection | None,
        bias: bool,
        offset: int = 0,
    ):
        self.index = index
        self.name = name
        self.module = module
        self.projection = projection
        self.bias = bias
        self.offset = offset
        self.functional = False  # captured at its functional call, not by a module hook
        self.seq_first = False  # inputs [T, B, ...]: a batch_first=False transformer layer's Linear
        self.r_in = projection.p_in.rank if projection is not None else 0
        self.r_out = projection.p_out.rank if projection is not None else 0
        # Whether x̃ is always a new tensor (then the mask and scale apply in place): not for a
        # Linear side kept whole without bias, whose x̃ is a view of the layer's input.
        self.fresh_inputs = (
            (projection is not None and projection.p_in.matrix is not None)
            or bias
            or isinstance(module, (nn.Embedding, *CONVOLUTIONS))
        )

    def attach(self, block: CaptureBlock) -> torch.utils.hooks.RemovableHandle:
        if not isinstance(self.module, nn.Module) or self.functional:  # seen by functional_uses.py
            return _NO_HOOK
        return self.module.register_forward_hook(partial(self._forward, block))

    def _forward(self, block: CaptureBlock, module: nn.Module, inputs: tuple, output: torch.Tensor):
        if not torch.is_grad_enabled():
            return None  # evaluation under no_grad inside the block: nothing to attribute
        if shared_across_batch(self.name, module, inputs[0], block):
            return None
        replaced = False
        if not output.requires_grad:
            if not block.attribution_only:
                return None  # frozen input side of the graph: no gradient will reach this layer
            # Parameters are frozen in attribution-only mode: make the output a leaf so that
            # backward reaches it (and stops there) without any weight-gradient work.
            output = output.detach().requires_grad_(True)
            replaced = True
        x = inputs[0].transpose(0, 1) if self.seq_first else inputs[0]
        if isinstance(module, nn.Embedding) and x.shape[0] == 1 and (block.batch_size or 1) > 1:
            # One lookup for the whole batch (position ids [1, T]): each example gets its own copy
            # (a view: the model computes the same values and the same weight gradient, summed
            # over the copies as broadcasting would), so backward brings each example's ∂ℓ/∂y.
            x = x.expand(block.batch_size, *x.shape[1:])
            output = output.expand(block.batch_size, *output.shape[1:])
            replaced = True
        if block.batch_size is not None and x.shape[0] != block.batch_size:
            raise CaptureError(
                f"module {self.name!r} saw a batch of {x.shape[0]} examples but data_id has "
                f"{block.batch_size} ids; pass one id per example (batch dimension first)"
            )
        x = x.detach()
        if block.mask is not None and not block.mask_used:
            if mask_applies(block.mask, module, _positions(module, x)):
                block.mask_used = True
            else:
                block.mask_skipped[self.name] = tuple(x.shape)
        x_proj = None
        with torch.no_grad(), full_precision(x.device):
            if block.projected:
                x_proj = projected_inputs(module, x, self.projection.p_in, self.bias)
                mask = position_mask(block.mask, module, self.name, x_proj)
                if not self.fresh_inputs and (mask is not None or block.grad_scale != 1.0):
                    x_proj = x_proj.clone()
                if mask is not None:
                    x_proj.mul_(mask.unsqueeze(-1))
                if block.grad_scale != 1.0:  # undo a mean-reduced loss's 1/B on the smaller side
                    x_proj.mul_(block.grad_scale)
            for sink in block.sinks:
                sink.forward(self, block, x)
        output.register_hook(partial(self._backward, block, ForwardCall(x_proj)))
        if block.outputs is not None:
            block.outputs.append(output)
        return output if replaced else None

    def _backward(self, block: CaptureBlock, call: ForwardCall, grad: torch.Tensor) -> None:
        if not block.open:
            raise CaptureError(
                f"backward reached {self.name!r} after its `with run(data_id=...)` block had "
                "exited; call loss.backward() inside the block"
            )
        with torch.no_grad(), full_precision(grad.device):
            grad = grad.detach().transpose(0, 1) if self.seq_first else grad.detach()
            g_proj = None
            if block.projected:
                g_proj = projected_output_grads(self.module, grad, self.projection.p_out)
            for sink in block.sinks:
                sink.backward(self, block, call, g_proj, grad)
        call.backwards += 1
        block.reached.add(self.index)
        return None


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


def attach_hooks(captures: list[ModuleCapture], block: CaptureBlock) -> list:
    """Forward hooks of `captures` feeding `block`'s sinks; remove the returned handles (and set
    `block.open = False`) when the block ends."""
    return [c.attach(block) for c in captures]
