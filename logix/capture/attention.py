"""nn.MultiheadAttention's projections as entries of the module table.

`nn.MultiheadAttention` holds its q, k, v projections as parameters of its own, not as
submodules: a packed `in_proj_weight` [3E, E] (q, k, v rows in that order), or, when the key or
value width differs from E, `q_proj_weight` [E, E], `k_proj_weight` [E, kdim] and
`v_proj_weight` [E, vdim]; the bias is one packed `in_proj_bias` [3E] either way. Its forward
applies them, and its `out_proj` weight, through `F.multi_head_attention_forward`, so module
hooks never see them. Each becomes an `AttentionProjection`, a linear map y = W x (+ b) with a
name (`<attention>.in_proj`, `.q_proj`, `.k_proj`, `.v_proj`) and a type
(`MultiheadAttention.in_proj`, ...) of its own; `functional_uses.py` captures the `F.linear`
calls that use them. `out_proj` stays the Linear entry it always was (`<attention>.out_proj`).
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from logix.notices import warn


class AttentionProjection:
    """One projection of an `nn.MultiheadAttention`: W = `weight` [d_out, d_in], its bias the
    slice [bias_start, bias_start + d_out) of the packed `bias` (None without biases)."""

    def __init__(
        self,
        attention: nn.MultiheadAttention,
        kind: str,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        bias_start: int,
    ):
        self.attention = attention
        self.kind = kind
        self.logix_type = f"MultiheadAttention.{kind}"  # its type in the module table
        self.weight = weight
        self.bias = bias
        self.bias_start = bias_start
        self.out_features, self.in_features = weight.shape

    def __repr__(self) -> str:
        return f"AttentionProjection({self.kind}, {tuple(self.weight.shape)})"


def attention_projections(
    name: str, attention: nn.MultiheadAttention
) -> list[tuple[str, AttentionProjection]]:
    """The table entries of one attention layer's q, k, v projections (packed or separate)."""
    if attention.bias_k is not None and not getattr(attention, "_logix_bias_kv_noticed", False):
        attention._logix_bias_kv_noticed = True
        warn(
            f"{name!r} has add_bias_kv=True: its q, k, v and out projections are captured exactly, "
            f"its bias_k and bias_v vectors ({2 * attention.embed_dim} parameters) are not"
        )
    bias, e = attention.in_proj_bias, attention.embed_dim
    if attention.in_proj_weight is not None:
        return [
            (f"{name}.in_proj", AttentionProjection(attention, "in_proj", attention.in_proj_weight, bias, 0))
        ]
    weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
    return [
        (f"{name}.{kind}", AttentionProjection(attention, kind, w, bias, i * e))
        for i, (kind, w) in enumerate(zip(("q_proj", "k_proj", "v_proj"), weights))
    ]


def with_attention_projections(
    items: Iterable[tuple[str, nn.Module]],
) -> Iterator[tuple[str, nn.Module | AttentionProjection]]:
    """`named_modules()` items with each attention layer's projections right after the layer
    (before its `out_proj` child), so the module table keeps the model's order."""
    for name, module in items:
        yield name, module
        if isinstance(module, nn.MultiheadAttention) and name:
            yield from attention_projections(name, module)


def attention_parameters(
    selected: list[tuple[str, object]], include_bias: bool
) -> list[tuple[str, str, torch.Tensor]]:
    """(attention layer name, type, parameter) of every attention projection among `selected`:
    what the coverage table counts as captured (`coverage.model_coverage(also_captured=...)`)."""
    found = []
    for name, entry in selected:
        if isinstance(entry, AttentionProjection):
            layer = name.rsplit(".", 1)[0]
            found.append((layer, entry.logix_type, entry.weight))
            if include_bias and entry.bias is not None:
                found.append((layer, entry.logix_type, entry.bias))
    return found


def entry_parameters(module: nn.Module | AttentionProjection) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a table entry: the parameters whose gradient its columns hold (an
    attention projection's bias is its slice of the packed bias)."""
    return module.weight, getattr(module, "bias", None)


def _unchecked(func):
    """`func` with the same code and globals but for `has_torch_function`, so that the mode that
    intercepted it can run its body with the mode still on (its inner calls then reach it)."""
    env = dict(func.__globals__)
    env["has_torch_function"] = lambda *_: False
    copy = types.FunctionType(func.__code__, env, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


# F.multi_head_attention_forward's body, run by functional_uses.py with its mode on.
ATTENTION_BODY = _unchecked(F.multi_head_attention_forward)
