"""One use of a watched weight that its module's hooks do not see: `F.linear(x, W[a:a+n], b)`
inside `nn.MultiheadAttention`, an output head tied to an embedding table, `F.linear(h, emb.weight)`
in the user's code. Each use adds its own per-example gradient into the entry's block:

    not transposed (W is the entry's [d_out, d_in] matrix, a row slice W[a:a+n] of it):
        G̃_n += Σ_t (P_out[:, a:a+n] g_t) (P_in [x_t, β])ᵀ      β = 1 when b is the matching slice
                                                              of the entry's bias, 0 without one
    transposed (W is an Embedding's table [vocab, dim], the entry's block is [dim, vocab]):
        G̃_n += Σ_t (P_out h_t) (P_in[:, a:a+n] g_t)ᵀ

so the block of a parameter used k times holds the gradient of all k uses summed, exactly. The
inputs and gradients arrive batch first ([B, ..., d]) or, inside `F.multi_head_attention_forward`,
sequence first ([T, B, d] or [T·B, d], `layout` = B); both are arranged as [B, T, d].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from logix.capture.hooks import CaptureBlock, ForwardCall, ModuleCapture, position_mask
from logix.capture.per_sample import full_precision
from logix.capture.projection import SideProjection
from logix.errors import CaptureError


class _LinearLike:
    """What sinks see as a use's module: a linear map at every position (not an Embedding's
    one-hot nor a Conv2d's pixels)."""


LINEAR_LIKE = _LinearLike()


@dataclass
class WeightTarget:
    """Where the uses of one watched weight go: `capture`'s block; `weight` [rows, cols];
    `transposed` for an Embedding's table; the bias column is the slice
    [bias_start + a, bias_start + a + n) of `bias` for the rows [a, a + n) of the weight."""

    capture: ModuleCapture
    weight: torch.Tensor
    transposed: bool
    bias: torch.Tensor | None
    bias_start: int = 0


class UseCapture:
    """The entry a use feeds, as sinks read it (index, name, offset, ranks, projection)."""

    def __init__(self, capture: ModuleCapture):
        self.index, self.name, self.offset = capture.index, capture.name, capture.offset
        self.r_in, self.r_out, self.bias = capture.r_in, capture.r_out, capture.bias
        self.projection = capture.projection
        self.module = LINEAR_LIKE


def row_range(weight: torch.Tensor, w: torch.Tensor) -> tuple[int, int] | None:
    """(a, n) when `w` is the rows [a, a + n) of the 2-D `weight` (itself or a row slice of it,
    as `split`/`chunk`/`[a:b]` make them), else None."""
    if w is weight:
        return 0, weight.shape[0]
    if w.ndim != 2 or weight.ndim != 2 or w.shape[1] != weight.shape[1] or w.stride() != weight.stride():
        return None
    shift = w.storage_offset() - weight.storage_offset()
    step = weight.stride(0)
    if step <= 0 or shift % step or not 0 <= shift // step <= weight.shape[0] - w.shape[0]:
        return None
    return shift // step, w.shape[0]


def bias_flag(target: WeightTarget, b: torch.Tensor | None, a: int, n: int, watched) -> float | None:
    """β of a use: 1.0 when `b` is the entry's bias slice for rows [a, a + n), 0.0 for no bias
    or a bias logix does not watch, None for another watched tensor (not capturable)."""
    if b is None:
        return 0.0
    base = b if b._base is None else b._base
    if target.bias is not None and base is target.bias:
        start = target.bias_start + a
        if b.ndim == 1 and b.shape[0] == n and b.stride() == (1,):
            if b.storage_offset() - target.bias.storage_offset() == start:
                return 1.0
        return None
    return None if watched(b) else 0.0


def arranged(t: torch.Tensor, layout: int | None) -> torch.Tensor:
    """[B, T, d] from batch-first [B, ..., d] (layout None) or sequence-first [T, B, d] /
    [T·B, d] with B = layout."""
    if layout is None:
        return t.reshape(t.shape[0], -1, t.shape[-1])
    return t.reshape(-1, layout, t.shape[-1]).transpose(0, 1)


def side_columns(side: SideProjection, start: int, count: int, v: torch.Tensor) -> torch.Tensor:
    """P[:, start:start+count] v for v [..., count] -> [..., rank] (a side kept whole: v set
    into zeros of its full width)."""
    if side.matrix is None:
        if start == 0 and count == side.dim:
            return v
        out = v.new_zeros(v.shape[:-1] + (side.dim,))
        out[..., start : start + count] = v
        return out
    if side.matrix.device != v.device:
        side.matrix = side.matrix.to(v.device)
    return v @ side.matrix[:, start : start + count].T


def _check_pass(block: CaptureBlock, capture: ModuleCapture) -> None:
    if not block.projected or not all(s.projected for s in block.sinks) or capture.projection is None:
        raise CaptureError(
            f"{capture.name!r} is used through a functional call (attention or a tied weight), which "
            "this pass cannot capture: projection.kind 'pca' / 'kfac-whitened' statistics are not "
            f"supported for it yet; use projection.kind 'random' or 'identity', or exclude {capture.name!r}"
        )


def _scaled_and_masked(block: CaptureBlock, name: str, near: torch.Tensor) -> torch.Tensor:
    """The forward side [B, T, r] with padded positions zeroed and a mean's 1/B undone."""
    mask = position_mask(block.mask, LINEAR_LIKE, name, near)
    if mask is not None:
        near = near * mask.unsqueeze(-1)
        block.mask_used = True
    return near * block.grad_scale if block.grad_scale != 1.0 else near


def _on_backward(block, capture, out, layout, near, far, forward_is_input: bool) -> None:
    """Hook `out`: at backward, `far(g [B, T, d])` is the other side; the sinks get x̃ and g̃
    (the forward side `near` is x̃ when `forward_is_input`, else g̃)."""
    use = UseCapture(capture)
    call = ForwardCall(near if forward_is_input else None)

    def backward(grad: torch.Tensor) -> None:
        if not block.open:
            raise CaptureError(
                f"backward reached {capture.name!r} after its `with run(data_id=...)` block had "
                "exited; call loss.backward() inside the block"
            )
        with torch.no_grad(), full_precision(grad.device):
            other = far(arranged(grad.detach(), layout).float())
            if forward_is_input:
                g_proj = other
            else:
                call.x_proj, g_proj = other, near
            for sink in block.sinks:
                sink.backward(use, block, call, g_proj, grad)
        call.backwards += 1
        block.reached.add(capture.index)

    out.register_hook(backward)
    if block.outputs is not None:
        block.outputs.append(out)


def _leaf_or_none(block: CaptureBlock, out: torch.Tensor) -> torch.Tensor | None:
    """`out` if backward can reach it (a leaf in attribution-only mode), else None."""
    if out.requires_grad:
        return out
    return out.detach().requires_grad_(True) if block.attribution_only else None


def record_use(
    block: CaptureBlock,
    target: WeightTarget,
    x: torch.Tensor,
    rows: tuple[int, int],
    beta: float,
    out: torch.Tensor,
    layout: int | None,
) -> torch.Tensor:
    """Capture one use y = F.linear(x, W[a:a+n], b) = `out`: the forward side now, the
    backward side from a tensor hook on `out`. Returns `out` (a leaf in attribution-only
    mode, as the module hooks make it)."""
    capture = target.capture
    _check_pass(block, capture)
    reachable = _leaf_or_none(block, out)
    if reachable is None:
        return out
    batch = x.shape[0] if layout is None else layout
    if x.ndim < 2 or (block.batch_size is not None and batch != block.batch_size):
        raise CaptureError(
            f"{capture.name!r} is used by F.linear on an input of shape {list(x.shape)} whose batch "
            f"axis does not hold the block's {block.batch_size} examples; pass inputs batch first "
            "[batch, ..., features] (a flattened [batch·seq, features] input cannot be attributed)"
        )
    a, n = rows
    p = capture.projection
    with torch.no_grad(), full_precision(x.device):
        xs = arranged(x.detach(), layout).float()
        if target.transposed:
            near = p.p_out.apply(xs)
        else:
            if capture.bias:
                xs = torch.cat([xs, xs.new_full(xs.shape[:-1] + (1,), beta)], dim=-1)
            near = p.p_in.apply(xs)
        near = _scaled_and_masked(block, capture.name, near)
    side = p.p_in if target.transposed else p.p_out
    _on_backward(
        block, capture, reachable, layout, near, lambda g: side_columns(side, a, n, g), not target.transposed
    )
    return reachable


def record_lookup(
    block: CaptureBlock, capture: ModuleCapture, idx: torch.Tensor, padding_idx: int | None, out: torch.Tensor
) -> torch.Tensor:
    """Capture an Embedding lookup y = W[idx] of a Linear's weight W [d_out, d_in] (an
    embedding tied to a watched head): its gradient e_idx gᵀ adds (P_out e_idx)(P_in [g, 0])ᵀ,
    the forward side a column gather of P_out, the bias column (if any) untouched."""
    _check_pass(block, capture)
    reachable = _leaf_or_none(block, out)
    if reachable is None:
        return out
    if idx.ndim < 1 or (block.batch_size is not None and idx.shape[0] != block.batch_size):
        raise CaptureError(
            f"the Embedding tied to {capture.name!r} looked up indices {list(idx.shape)} whose first "
            f"axis does not hold the block's {block.batch_size} examples; pass [batch, seq] indices"
        )
    p = capture.projection
    with torch.no_grad(), full_precision(idx.device):
        idx = idx.reshape(idx.shape[0], -1)
        if p.p_out.matrix is None:
            near = F.one_hot(idx, p.p_out.dim).float()
        else:
            near = p.p_out.matrix.to(idx.device).T[idx]
        if padding_idx is not None:
            near = near * (idx != padding_idx).unsqueeze(-1)
        near = _scaled_and_masked(block, capture.name, near)

    def far(g: torch.Tensor) -> torch.Tensor:
        if capture.bias:
            g = torch.cat([g, g.new_zeros(g.shape[:-1] + (1,))], dim=-1)
        return p.p_in.apply(g)

    _on_backward(block, capture, reachable, None, near, far, False)
    return reachable
