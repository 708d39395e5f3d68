"""Projected per-example gradient kernels for Linear, Conv1D, Conv2d and Embedding (DESIGN §1).

Every supported layer is a linear map y = W x (+ b) applied at T positions of each example:
Linear at every leading position, Conv1D (Hugging Face's GPT-2 layer, weight [d_in, d_out],
y = x weight + b, so W = weightᵀ) likewise, Conv2d at every output pixel (x = an unfolded patch),
Embedding at every token (x = one-hot). The projected gradient of example n is

    G̃_n = Σ_t (P_out g_{n,t}) (P_in x_{n,t})ᵀ   [r_out, r_in]

formed from the projected activations x̃ [B, T, r_in] and projected output-gradients
g̃ [B, T, r_out] alone: the full [B, T, d_out, d_in] product never exists.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from logix.capture.projection import SideProjection

SUPPORTED = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}
TYPE_NAMES = ("Linear", "Conv1D", "Conv2d", "Embedding")


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


def check_supported(name: str, module: nn.Module) -> None:
    """Reject layer variants whose per-example gradient is not one outer product per position."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(
            f"module {name!r} is a grouped Conv2d (groups={module.groups}), which logix does not "
            f"capture yet; add {name!r} to capture.exclude"
        )


def has_bias(module: nn.Module, include_bias: bool) -> bool:
    return include_bias and getattr(module, "bias", None) is not None


def layer_dims(module: nn.Module, include_bias: bool) -> tuple[int, int]:
    """(d_in, d_out) of the linear map; d_in counts the appended 1 of the bias."""
    if isinstance(module, nn.Linear):
        d_in, d_out = module.in_features, module.out_features
    elif is_conv1d(module):
        d_in, d_out = module.weight.shape
    elif isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        d_in, d_out = module.in_channels * kh * kw, module.out_channels
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


def _conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, C*kh*kw], the input patch of every output position."""
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    padding = module.padding
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
    cols = F.unfold(x, (kh, kw), dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2)


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
    if isinstance(module, nn.Conv2d):
        x = _conv_patches(module, x)
    else:  # Linear and Conv1D: every leading position
        x = x.reshape(batch, -1, x.shape[-1])
    return _project_with_bias(x.float(), p_in, bias)


def output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """∂ℓ/∂y arranged as [B, T, d_out] in the same position order as `projected_inputs`."""
    batch = g.shape[0]
    if isinstance(module, nn.Conv2d):
        return g.reshape(batch, g.shape[1], -1).transpose(1, 2)
    return g.reshape(batch, -1, g.shape[-1])


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
