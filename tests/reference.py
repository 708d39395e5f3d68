"""Exact references for tests: per-example gradients from torch.func, arranged like a store row."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from logix.store.format import ModuleInfo


def per_example_grads(model: nn.Module, loss_fn, inputs: tuple, targets: torch.Tensor) -> dict:
    """{param name: [B, *param.shape]}: ∇ of each example's own loss, by vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, *args):
        *xs, y = args
        xs = [x.unsqueeze(0) for x in xs]
        out = functional_call(model, p, tuple(xs))
        return loss_fn(out, y.unsqueeze(0))

    in_dims = (None,) + (0,) * (len(inputs) + 1)
    return vmap(grad(one), in_dims=in_dims)(params, *inputs, targets)


def module_gradient(module: nn.Module, name: str, grads: dict, bias: bool) -> torch.Tensor:
    """The per-example gradient of the linear map y = W x (+ b) as [B, d_out, d_in(+1)]."""
    w = grads[f"{name}.weight"]
    batch = w.shape[0]
    if isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D":
        g = w.transpose(1, 2)  # the map is weightᵀ: [dim, vocab] / [d_out, d_in]
    else:
        g = w.reshape(batch, w.shape[1], -1)
    if bias and getattr(module, "bias", None) is not None:
        g = torch.cat([g, grads[f"{name}.bias"].reshape(batch, -1, 1)], dim=2)
    return g


def entry_gradient(named: dict, m: ModuleInfo, grads: dict) -> torch.Tensor:
    """[B, d_out, d_in(+1)] of one module-table entry: a module's map, or an
    nn.MultiheadAttention projection (`<attn>.in_proj`, `.q_proj`, `.k_proj`, `.v_proj`) from the
    attention layer's own parameters (packed bias sliced for q, k, v)."""
    if not m.type.startswith("MultiheadAttention."):
        return module_gradient(named[m.name], m.name, grads, m.bias)
    layer, kind = m.name.rsplit(".", 1)
    w = grads[f"{layer}.in_proj_weight" if kind == "in_proj" else f"{layer}.{kind}_weight"]
    if m.bias:
        e = named[layer].embed_dim
        b = grads[f"{layer}.in_proj_bias"]
        if kind != "in_proj":
            start = ("q_proj", "k_proj", "v_proj").index(kind) * e
            b = b[:, start : start + e]
        w = torch.cat([w, b[:, :, None]], dim=2)
    return w


def projected_rows(
    model: nn.Module, modules: list[ModuleInfo], projections: dict, grads: dict
) -> torch.Tensor:
    """Rows [B, D]: P_out G P_inᵀ per module, flattened row-major, in module-table order."""
    named = dict(model.named_modules())
    blocks = []
    for m in modules:
        g = entry_gradient(named, m, grads).double()
        p = projections[m.name]
        if p.p_out.matrix is not None:
            g = p.p_out.matrix.double() @ g
        if p.p_in.matrix is not None:
            g = g @ p.p_in.matrix.double().T
        blocks.append(g.reshape(g.shape[0], -1))
    return torch.cat(blocks, dim=1)
