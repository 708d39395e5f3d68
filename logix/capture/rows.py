"""The rows sink: each example's projected gradient G̃ [r_out, r_in] per module, summed in place
into its column block of the block's rows [B, D] (DESIGN §2: row-major [r_out, r_in])."""

from __future__ import annotations

import torch

from logix.capture.hooks import CaptureBlock, ForwardCall, ModuleCapture, Sink
from logix.capture.per_sample import projected_gradient
from logix.store.format import ModuleInfo


class RowSink(Sink):
    """Rows [B, D] of one block. `destination`: a preferred CPU buffer (the store's shard
    buffer slice) used when the gradients are on its device; otherwise rows are allocated on
    the gradients' device. `written`: indices of the modules whose columns hold a gradient."""

    def __init__(self, batch_size: int, width: int, destination: torch.Tensor | None = None):
        self.batch_size = batch_size
        self.width = width
        self.destination = destination
        self.rows: torch.Tensor | None = None
        self.written: set[int] = set()

    def backward(
        self,
        capture: ModuleCapture,
        block: CaptureBlock,
        call: ForwardCall,
        g_proj: torch.Tensor | None,
        grad: torch.Tensor,
    ) -> None:
        if self.rows is None:
            if self.destination is not None and self.destination.device == g_proj.device:
                self.rows = self.destination
            else:
                self.rows = torch.empty(self.batch_size, self.width, device=g_proj.device)
        cols = self.rows[:, capture.offset : capture.offset + capture.r_out * capture.r_in]
        out = cols.view(self.batch_size, capture.r_out, capture.r_in)
        projected_gradient(call.x_proj, g_proj, out=out, accumulate=capture.index in self.written)
        self.written.add(capture.index)

    def finish(self, modules: list[ModuleInfo]) -> torch.Tensor:
        """The rows, with zero columns for modules no backward reached (their gradient is 0)."""
        for i, m in enumerate(modules):
            if i not in self.written:
                self.rows[:, m.columns].zero_()
        return self.rows

    def reset(self) -> None:
        """Start new rows (in the same destination): one backward pass of a Fisher pass each."""
        self.rows = None
        self.written = set()
