"""Watched parameters used outside their module's forward: seen, captured, or refused.

Module hooks see a weight only when its module's forward runs. `nn.MultiheadAttention` applies
its q, k, v and out projections through `F.multi_head_attention_forward`; a tied head runs
another module (or a bare `F.linear`) on an embedding's table. While a block is active, a
`TorchFunctionMode` sees the functional calls: an `F.linear(x, w, b)` whose `w` is a watched
weight, or a row slice of it, runs as it would and is captured as one use (`linear_uses.py`);
`F.multi_head_attention_forward` runs its own code unchanged (the same ops, so outputs and
gradients are bit-identical), with its linear calls seen and their sequence-first layout known.

Cost is paid only where it buys something: the first block of a run runs under the mode from
start to end and audits every op that touches a watched parameter outside its module; any such
op logix cannot capture (`x @ w.T`, einsum, a copy of the weight) that backward reaches is an
error at the end of that block, naming the module and the op. After it, the mode covers the
whole block only if the model used a watched weight through `F.linear` outside attention;
otherwise only the forwards of the attention layers that hold watched weights (a pre- and a
post-hook), and a model with neither runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from logix.capture.attention import ATTENTION_BODY, entry_parameters
from logix.capture.hooks import CaptureBlock, ModuleCapture
from logix.capture.linear_uses import WeightTarget, bias_flag, record_lookup, record_use, row_range
from logix.capture.tied import tied_sharers
from logix.errors import CaptureError


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


class _Interceptor(TorchFunctionMode):
    def __init__(self, uses: FunctionalUses):
        super().__init__()
        self.uses = uses

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return self.uses.linear(args, kwargs)
        if func is F.embedding:
            return self.uses.embedding(args, kwargs)
        if func is F.multi_head_attention_forward:
            return self.uses.attention(self, args, kwargs)
        if self.uses.auditing:
            return self.uses.audit(func, args, kwargs)
        return func(*args, **kwargs)


@dataclass
class _Handle:
    uses: FunctionalUses
    handles: list = field(default_factory=list)
    mode: TorchFunctionMode | None = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None
        self.uses.block = None


class FunctionalUses:
    """The functional side of a run's capture: the watched weights (`targets`), the attention
    layers that hold them, the tied modules, and whether the first block's audit is done."""

    def __init__(self, model: nn.Module, captures: list[ModuleCapture]):
        self.captures = captures
        self.targets: dict[int, WeightTarget] = {}
        self.watched: dict[int, str] = {}  # id(parameter) -> entry name, weights and biases
        self.own: dict[int, set[int]] = {}  # id(module with hooks) -> ids of the parameters it uses itself
        for c in captures:
            weight, bias = entry_parameters(c.module)
            self.targets[id(weight)] = WeightTarget(
                c, weight, isinstance(c.module, nn.Embedding), bias, getattr(c.module, "bias_start", 0)
            )
            self.watched[id(weight)] = c.name
            if bias is not None:
                self.watched[id(bias)] = c.name
            if isinstance(c.module, nn.Module):
                self.own[id(c.module)] = {id(weight), id(bias)}
        self.sharers: list[tuple[nn.Module, ModuleCapture | WeightTarget]] = []
        for name, module, i, how in tied_sharers(model, [(c.name, c.module) for c in captures]):
            owner = captures[i]
            self.own[id(module)] = {id(module.weight), id(getattr(module, "bias", None))}
            if how == "same":
                clone = ModuleCapture(owner.index, name, module, owner.projection, owner.bias, owner.offset)
                self.sharers.append((module, clone))
            elif how == "lookup":
                self.sharers.append((module, owner))
            else:
                self.sharers.append((module, self.targets[id(module.weight)]))
        self.attentions = [
            m
            for m in model.modules()
            if isinstance(m, nn.MultiheadAttention) and any(id(p) in self.targets for p in m.parameters())
        ]
        # Embedding subclasses with a forward of their own (HF's scaled or positional embeddings):
        # what reaches F.embedding is not their input, nor is their output its output.
        self.embeddings: dict[int, ModuleCapture] = {}
        for c in [*captures, *(s for _, s in self.sharers if isinstance(s, ModuleCapture))]:
            if isinstance(c.module, nn.Embedding) and type(c.module).forward is not nn.Embedding.forward:
                c.functional = True
                self.embeddings[id(c.module)] = c
        self.modules = {id(m): m for m in model.modules() if id(m) in self.own}
        mark_sequence_first(model, captures)
        self.audited = False  # the first clean block audited every use
        self.outside = False  # a watched weight is used through F.linear outside attention
        self.auditing = False
        self.block: CaptureBlock | None = None
        self.layout: list[int | None] = [None]  # batch of the attention call now running, else None
        self.running: list[nn.Module] = []  # modules with hooks whose forward is running
        self.mode = _Interceptor(self)
        self.mode_on = False

    def captured_parameters(self) -> dict[int, str]:
        """id(parameter) -> the entry its gradient is stored in (shared weights included)."""
        return dict(self.watched)

    # -- per block ----------------------------------------------------------------------------
    def attach(self, block: CaptureBlock) -> _Handle:
        self.block = block
        self.running, self.layout = [], [None]  # nothing left over from a failed block
        self.auditing = not self.audited
        block.audit = self if self.auditing else None
        handle = _Handle(self)
        for module, share in self.sharers:
            if (
                isinstance(share, ModuleCapture) and share.module is not module
            ):  # an Embedding on a head's weight
                handle.handles.append(module.register_forward_hook(self._lookup_forward(share)))
            elif isinstance(share, ModuleCapture):
                handle.handles.append(share.attach(block))
            else:
                handle.handles.append(module.register_forward_hook(self._tied_forward(share)))
        whole = self.auditing or self.outside
        for module in self.modules.values():
            if whole or id(module) in self.embeddings:
                handle.handles.append(module.register_forward_pre_hook(self._enter_module))
                handle.handles.append(module.register_forward_hook(self._exit_module, always_call=True))
        if whole:
            self.mode.__enter__()
            handle.mode = self.mode
        else:
            for module in [*self.attentions, *(self.modules[i] for i in self.embeddings)]:
                handle.handles.append(module.register_forward_pre_hook(self._mode_on))
                handle.handles.append(module.register_forward_hook(self._mode_off, always_call=True))
        return handle

    def _enter_module(self, module, inputs):
        self.running.append(module)

    def _exit_module(self, module, inputs, output):
        if self.running and self.running[-1] is module:
            self.running.pop()

    def _mode_on(self, module, inputs):
        if not self.mode_on:
            self.mode.__enter__()
            self.mode_on = True

    def _mode_off(self, module, inputs, output):
        if self.mode_on:
            self.mode_on = False
            self.mode.__exit__(None, None, None)

    def _lookup_forward(self, capture: ModuleCapture):
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
                return record_lookup(self.block, capture, inputs[0], module.padding_idx, output)
            return None

        return hook

    def _tied_forward(self, target: WeightTarget):
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
                return record_use(
                    self.block, target, inputs[0], (0, target.weight.shape[0]), 0.0, output, None
                )
            return None

        return hook

    # -- what the mode sees -------------------------------------------------------------------
    def attention(self, mode: TorchFunctionMode, args, kwargs):
        query = args[0] if args else kwargs["query"]
        if query.ndim != 3:
            raise CaptureError(
                f"an nn.MultiheadAttention with watched weights got an unbatched query {list(query.shape)}; "
                "pass [batch, seq, embed] (batch_first=True) or [seq, batch, embed] inputs"
            )
        self.layout.append(query.shape[1])
        try:
            with mode:
                return ATTENTION_BODY(*args, **kwargs)
        finally:
            self.layout.pop()

    def embedding(self, args, kwargs):
        """F.embedding inside an Embedding subclass with a forward of its own: captured here, with
        the indices and output of this call (the module's hooks would see neither)."""
        out = F.embedding(*args, **kwargs)
        capture = self.embeddings.get(id(self.running[-1])) if self.running else None
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if capture is not None and weight is capture.module.weight:
            idx = args[0] if args else kwargs["input"]
            replaced = capture._forward(self.block, capture.module, (idx,), out)
            return out if replaced is None else replaced
        return self.audit(F.embedding, args, kwargs, out) if self.auditing else out

    def linear(self, args, kwargs):
        names = ("input", "weight", "bias")
        x, w, b = (*args, *(kwargs.get(k) for k in names[len(args) :]))[:3]
        base = w if w._base is None else w._base
        target = self.targets.get(id(base))
        if target is None or not torch.is_grad_enabled():
            return self.audit(F.linear, args, kwargs) if self.auditing else F.linear(*args, **kwargs)
        if self.running and id(base) in self.own.get(id(self.running[-1]), ()):
            return F.linear(*args, **kwargs)  # the module's own forward: its hooks capture it
        out = F.linear(*args, **kwargs)
        rows = row_range(target.weight, w)
        beta = None if rows is None else bias_flag(target, b, *rows, self.is_watched)
        if rows is None or beta is None or (target.transposed and beta) or not self._linear_entry(target):
            self._refuse(
                out,
                target.capture.name,
                "F.linear on a weight that is not the module's matrix or a row slice of it",
            )
            return out
        if self.layout[-1] is None:
            self.outside = True
        return record_use(self.block, target, x, rows, beta, out, self.layout[-1])

    @staticmethod
    def _linear_entry(target: WeightTarget) -> bool:
        """Entries a `F.linear` use maps into: linear maps W [d_out, d_in] and Embedding tables."""
        m = target.capture.module
        return target.transposed or isinstance(m, nn.Linear) or hasattr(m, "logix_type")

    def is_watched(self, t: torch.Tensor) -> bool:
        return id(t) in self.watched or (t._base is not None and id(t._base) in self.watched)

    def audit(self, func, args, kwargs, out=None):
        """Run `func` (unless its `out` is given); if it reads a watched parameter outside that
        parameter's module, is not a view of it, and backward reaches its result, the block
        records an uncapturable use."""
        out = func(*args, **kwargs) if out is None else out
        if not torch.is_grad_enabled():
            return out
        name = next((self._name(t) for t in _tensors(args, kwargs) if self.is_watched(t)), None)
        if name is None or (self.running and self._own_call(args, kwargs)):
            return out
        for result in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(result, torch.Tensor) and not self.is_watched(result):
                self._refuse(result, name, getattr(func, "__name__", repr(func)))
        return out

    def _name(self, t: torch.Tensor) -> str:
        return self.watched.get(id(t), self.watched.get(id(t._base)))

    def _own_call(self, args, kwargs) -> bool:
        own = self.own.get(id(self.running[-1]), ())
        return any(
            id(t) in own or (t._base is not None and id(t._base) in own) for t in _tensors(args, kwargs)
        )

    def _refuse(self, result: torch.Tensor, name: str, op: str) -> None:
        if not result.requires_grad:
            return
        block = self.block

        def reached(grad):
            message = f"{name!r}: {op}"
            if message not in block.uncapturable:
                block.uncapturable.append(message)

        result.register_hook(reached)


def mark_sequence_first(model: nn.Module, captures: list[ModuleCapture]) -> None:
    """The feed-forward Linears of `nn.TransformerEncoderLayer` / `DecoderLayer` with
    batch_first=False see [T, B, d]: their captures read the batch from the second axis."""
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    inner = {
        id(m)
        for layer in model.modules()
        if isinstance(layer, layers) and not layer.self_attn.batch_first
        for m in (layer.linear1, layer.linear2)
    }
    for c in captures:
        c.seq_first = id(c.module) in inner


def check_functional_uses(block: CaptureBlock) -> None:
    """At the clean end of a block: an uncapturable use of a watched parameter is an error;
    the first block's audit is done."""
    if block.uncapturable:
        raise CaptureError(
            "watched parameters are used by operations logix cannot capture (their gradient would "
            f"be missing from the rows): {'; '.join(block.uncapturable[:5])}. Apply the weight "
            "through its module or F.linear(x, weight[, bias]), or add the module to capture.exclude"
        )
    if block.audit is not None and block.reached:
        block.audit.audited = True
