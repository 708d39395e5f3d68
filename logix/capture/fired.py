"""The first block's check that every watched module fired: a module that backward never reached
has zero columns in every row of that block, which is exact only if its weight took no part in
the loss. The check runs once per run, at the end of its first clean block.

A module counts as fired when its own hooks saw backward reach its output (`CaptureBlock.reached`)
or when another capture path accounted for its parameters (`CaptureBlock.fired`: names that a
functional interception, or a notice saying why the module is skipped, adds). For the others, a
gradient hook on the weight (`FirstBlockWatch`, during the first block only) tells the two cases
apart:

- the weight received a gradient: it was used outside the module's forward (e.g.
  `F.linear(x, module.weight)`), the zero columns would be wrong: always an error;
- it received none: the module did not take part in this batch's loss (its forward never ran,
  ran under no_grad, or it is frozen): an error by default (`capture.unfired: error`) naming
  the fix, `capture.exclude` for a module the model does not use; `capture.unfired: notice`
  warns instead, for a branch that only some batches use (its zero columns are then exact).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from logix.capture.hooks import CaptureBlock, ModuleCapture
from logix.errors import CaptureError
from logix.notices import warn


class FirstBlockWatch:
    """Gradient hooks on the watched modules' weights for one block: which weights received a
    gradient by any path. Hooks return nothing, so gradients are untouched; `remove` at exit."""

    def __init__(self, captures: list[ModuleCapture]):
        self.weight_used: set[int] = set()  # capture indices whose weight got a gradient
        self.handles = []
        for c in captures:
            weight = getattr(c.module, "weight", None)
            # Parameters only: a wrapper's views of a flat parameter (FSDP v1) are left alone
            # (such a module is then reported as taking no part, the message's other case).
            if isinstance(weight, nn.Parameter) and weight.requires_grad:
                self.handles.append(weight.register_hook(partial(self._used, c.index)))

    def _used(self, index: int, grad: torch.Tensor) -> None:
        self.weight_used.add(index)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def unfired(captures: list[ModuleCapture], block: CaptureBlock) -> list[ModuleCapture]:
    """The watched modules that neither their hooks nor another capture path saw in `block`."""
    return [c for c in captures if c.index not in block.reached and c.name not in block.fired]


def check_fired(
    captures: list[ModuleCapture], block: CaptureBlock, watch: FirstBlockWatch | None, mode: str
) -> bool:
    """Raise (or, for unused modules with `mode == 'notice'`, warn) about watched modules the
    block did not capture. Returns whether the check ran: not for a block that reached no module
    at all (the pass's own check names that mistake: no backward inside the block)."""
    if not block.reached and not block.fired:
        return False
    missing = unfired(captures, block)
    used = watch.weight_used if watch is not None else set()
    outside = [c.name for c in missing if c.index in used]
    idle = [c.name for c in missing if c.index not in used]
    if outside:
        raise CaptureError(
            f"the weight of watched module(s) {_list(outside)} received a gradient in the first "
            "block, but not through the module's forward (it is used elsewhere, e.g. "
            "F.linear(x, module.weight)), so its columns would be zero: logix does not capture "
            "that use. Add the module(s) to capture.exclude (their parameters are then listed "
            "as not captured)"
        )
    if not idle:
        return True
    text = (
        f"watched module(s) {_list(idle)} took no part in the first block's loss (forward not "
        "run, run under torch.no_grad(), or frozen), so their columns are zero"
    )
    if mode == "error":
        raise CaptureError(
            f"{text}. Add them to capture.exclude if the model does not use them (or they are "
            "frozen); for a branch that only some batches use, set capture.unfired: notice"
        )
    warn(
        f"{text} (exact: their gradient is zero for these examples). capture.unfired is 'notice'; "
        "add them to capture.exclude if the model never uses them",
    )
    return True


def _list(names: list[str], most: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return f"[{shown}{f', … ({len(names)} in all)' if len(names) > most else ''}]"
