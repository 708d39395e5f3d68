"""Stacked weights logix does not capture, said out loud: 3-D (or higher) parameters of modules
that are not layers logix knows, such as the fused experts of a mixture-of-experts layer
(transformers 5's Mixtral / Qwen2-MoE hold every expert's matrices in one `[experts, d_out,
d_in]` Parameter and apply them to the tokens routed to each expert by indexing or grouped
matrix products). Their per-example gradients would have to follow the routing; until logix
captures them, the notice names them and their share of the model's parameters."""

from __future__ import annotations

from torch import nn

from logix.capture.per_sample import layer_type
from logix.capture.wrappers import named_modules
from logix.notices import warn


def stacked_parameters(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, numel) of every ≥3-D parameter held directly by a module that is neither a
    layer type logix captures nor a torch convolution."""
    found = []
    for name, module in named_modules(model):
        if layer_type(module) is not None or isinstance(module, nn.modules.conv._ConvNd):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim >= 3:
                found.append((f"{name}.{pname}" if name else pname, tuple(p.shape), p.numel()))
    return found


def notice_stacked_parameters(model: nn.Module) -> None:
    """Warn, once per watch, about the stacked parameters `stacked_parameters` finds."""
    found = stacked_parameters(model)
    if not found:
        return
    total = sum(p.numel() for p in model.parameters())
    share = sum(n for *_, n in found) / max(total, 1)
    listed = ", ".join(f"{n} {list(s)}" for n, s, _ in found[:6]) + (" ..." if len(found) > 6 else "")
    warn(
        f"logix does not capture {len(found)} stacked (≥3-D) parameters, {share:.1%} of the model's "
        f"parameters: {listed}. These are typically mixture-of-experts experts applied to routed "
        "tokens; their gradients are not in the stored rows (attribution covers the other layers)"
    )
