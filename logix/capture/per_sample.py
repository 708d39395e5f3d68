"""Projected per-example gradient kernels for Linear, Conv1D, Conv1d, Conv2d and Embedding (DESIGN §1).

Every supported layer is a linear map y = W x (+ b) applied at T positions of each example:
Linear at every leading position, Conv1D (Hugging Face's GPT-2 layer, weight [d_in, d_out],
y = x weight + b, so W = weightᵀ) likewise, torch's Conv1d / Conv2d at every output position
(x = an unfolded patch), Embedding at every token (x = one-hot). A grouped (or depthwise)
convolution with G groups is G linear maps sharing nothing: W [C_out, C_in/G·k] holds group j's
map in its rows of group j, so its gradient is Σ_{t,j} g'_{t,j} x_{t,j}ᵀ with x_{t,j} group j's
patch and g'_{t,j} the output gradient kept on group j's channels only (zero elsewhere): the
layer is captured exactly as G·T positions of that one map. The projected gradient of example n is

    G̃_n = Σ_t (P_out g_{n,t}) (P_in x_{n,t})ᵀ   [r_out, r_in]

formed from the projected activations x̃ [B, T, r_in] and projected output-gradients
g̃ [B, T, r_out] alone: the full [B, T, d_out, d_in] product never exists.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from logix.capture.projection import SideProjection

SUPPORTED = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}
TYPE_NAMES = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Embedding")
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)  # positions are output pixels / steps, not tokens


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 and relatives), recognised by class name and its 2-D weight
    [d_in, d_out] so that capture never imports transformers. (torch's nn.Conv1d is another layer.)"""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def layer_type(module: nn.Module) -> str | None:
    """The supported type name of `module` (one of TYPE_NAMES) or None."""
    for name, cls in SUPPORTED.items():
        if isinstance(module, cls):
            return name
    if is_conv1d(module):
        return "Conv1D"
    return getattr(module, "logix_type", None)  # a projection inside a layer: capture/attention.py


def has_bias(module: nn.Module, include_bias: bool) -> bool:
    return include_bias and getattr(module, "bias", None) is not None


def layer_dims(module: nn.Module, include_bias: bool) -> tuple[int, int]:
    """(d_in, d_out) of the linear map; d_in counts the appended 1 of the bias."""
    if isinstance(module, nn.Linear):
        d_in, d_out = module.in_features, module.out_features
    elif is_conv1d(module):
        d_in, d_out = module.weight.shape
    elif isinstance(module, CONVOLUTIONS):  # one group's patch: C_in/G channels × the kernel
        d_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        d_out = module.out_channels
    elif isinstance(module, nn.Embedding):
        d_in, d_out = module.num_embeddings, module.embedding_dim
    elif hasattr(module, "logix_type"):  # capture/attention.py: y = W x (+ b) inside a layer
        d_in, d_out = module.in_features, module.out_features
    else:
        raise TypeError(f"unsupported module type {type(module).__name__}")
    return d_in + int(has_bias(module, include_bias)), d_out


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off on `device`. Hooks run inside the model's autocast region (the
    forward, a checkpoint's recomputation, a backward called under autocast), where a projection
    would round to bf16/fp16; logix upcasts activations and gradients and projects in float32.
    Outside autocast it is a no-op context (entering torch.autocast costs more than a hook's
    own arithmetic on a small layer)."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()  # reusable: nullcontext holds no state


def _conv_patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (Conv2d) or [B, C, L] (Conv1d, unfolded as an image of height 1) ->
    [B, T·G, C/G·k], the input patch of every output position t and group j (row t·G + j)."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
        padding = module.padding if isinstance(module.padding, str) else (0, *module.padding)
    else:
        kernel, dilation, stride, padding = module.kernel_size, module.dilation, module.stride, module.padding
    kh, kw = kernel
    dh, dw = dilation
    if isinstance(padding, str) or module.padding_mode != "zeros":
        if padding == "valid":
            pad = (0, 0, 0, 0)
        elif padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            ph, pw = padding
            pad = (pw, pw, ph, ph)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
        padding = 0
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    if module.groups > 1:  # group j's channels are the j-th contiguous slice of a patch
        batch, positions, width = cols.shape
        cols = cols.reshape(batch, positions * module.groups, width // module.groups)
    return cols


def _group_diagonal(g: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, T, C_out] -> [B, T·G, C_out]: row t·G + j keeps group j's channels of g_t, zero
    elsewhere (the output gradient of group j's map, as `_conv_patches` orders the positions)."""
    batch, positions, channels = g.shape
    eye = torch.eye(groups, dtype=g.dtype, device=g.device).reshape(1, 1, groups, groups, 1)
    blocks = g.reshape(batch, positions, 1, groups, channels // groups) * eye
    return blocks.reshape(batch, positions * groups, channels)


def _project_with_bias(x: torch.Tensor, p_in: SideProjection, bias: bool) -> torch.Tensor:
    """x [B, T, d] -> P_in [x, 1] [B, T, r_in] without concatenating the 1 when projecting."""
    if not bias:
        return p_in.apply(x)
    if p_in.matrix is None:
        return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
    bias_column, weight_t = p_in.bias_split(x.device)
    return torch.addmm(bias_column, x.reshape(-1, x.shape[-1]), weight_t).reshape(
        x.shape[:-1] + (weight_t.shape[1],)
    )


def projected_inputs(module: nn.Module, x: torch.Tensor, p_in: SideProjection, bias: bool) -> torch.Tensor:
    """The layer input of each example and position, projected: [B, T, r_in] float32."""
    batch = x.shape[0]
    if isinstance(module, nn.Embedding):
        idx = x.reshape(batch, -1)
        if p_in.matrix is None:
            xt = F.one_hot(idx, module.num_embeddings).float()
        else:
            m = p_in.matrix if p_in.matrix.device == idx.device else p_in.matrix.to(idx.device)
            xt = m.T[idx]  # a column gather of P_in: P_in e_idx
        if module.padding_idx is not None:
            xt = xt * (idx != module.padding_idx).unsqueeze(-1)
        return xt
    if isinstance(module, CONVOLUTIONS):
        x = _conv_patches(module, x)
    else:  # Linear and Conv1D: every leading position
        x = x.reshape(batch, -1, x.shape[-1])
    return _project_with_bias(x.float(), p_in, bias)


def output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """∂ℓ/∂y arranged as [B, T, d_out] in the same position order as `projected_inputs`."""
    batch = g.shape[0]
    if isinstance(module, CONVOLUTIONS):
        g = g.reshape(batch, g.shape[1], -1).transpose(1, 2)
        return _group_diagonal(g, module.groups) if module.groups > 1 else g
    return g.reshape(batch, -1, g.shape[-1])


def projected_output_grads(module: nn.Module, g: torch.Tensor, p_out: SideProjection) -> torch.Tensor:
    """P_out ∂ℓ/∂y as [B, T, r_out] float32 (T·G positions for a grouped convolution, whose
    block-diagonal output gradient is never formed when P_out is a matrix: each group's channels
    meet only their own columns of P_out)."""
    if not (isinstance(module, CONVOLUTIONS) and module.groups > 1 and p_out.matrix is not None):
        return p_out.apply(output_grads(module, g).float())
    batch, groups = g.shape[0], module.groups
    g = g.float().reshape(batch, groups, g.shape[1] // groups, -1)  # [B, G, C_out/G, T]
    if p_out.matrix.device != g.device:
        p_out.matrix = p_out.matrix.to(g.device)
    matrix = p_out.matrix  # [r_out, C_out]
    per_group = matrix.reshape(matrix.shape[0], groups, -1)  # [r_out, G, C_out/G]
    return torch.einsum("bgct,rgc->btgr", g, per_group).reshape(batch, -1, matrix.shape[0])


def projected_gradient(
    x_proj: torch.Tensor, g_proj: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False
) -> torch.Tensor:
    """Σ_t g̃_t x̃_tᵀ per example: [B, T, r_in], [B, T, r_out] -> [B, r_out, r_in].

    With `out` the result is written (or, with `accumulate`, added) in place: `out` may be a
    strided view into a larger row buffer, which saves assembling rows afterwards."""
    if x_proj.shape[1] == 1:  # one position: an outer product, no reduction
        g, x = g_proj[:, 0, :, None], x_proj[:, 0, None, :]
        if out is None:
            return g * x
        return out.addcmul_(g, x) if accumulate else torch.mul(g, x, out=out)
    result = torch.bmm(g_proj.transpose(1, 2), x_proj)
    if out is None:
        return result
    return out.add_(result) if accumulate else out.copy_(result)
