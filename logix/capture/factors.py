"""K-FAC factors in projected space, summed by the capture hooks while logging.

For every watched module and every position t of every example n that receives a gradient:

    A += x̃_{n,t} x̃_{n,t}ᵀ   [r_in, r_in]     x̃ = P_in x (with the bias's 1), padded positions left out
    S += g̃_{n,t} g̃_{n,t}ᵀ   [r_out, r_out]   g̃ = P_out ∂ℓ_n/∂y (a mean-reduced loss's 1/B undone)

with the number of positions per module and of examples, added by the hooks' `FactorSink`.
A step's sums (float32 GEMMs on the activations' device) are added to the float64 sums of a
segment only once the step's rows are accepted (`commit`), so a failed step leaves the factors
as they were.
The normalisation (F ≈ S/N_ex ⊗ A/N_pos) belongs to `logix.curvature.kfac`.
"""

from __future__ import annotations

import torch

from logix.capture.hooks import CaptureBlock, ForwardCall, ModuleCapture, Sink, position_mask

MAX_FACTOR_DIM = 16384  # a [r, r] float64 factor of this size is 2 GiB


class KroneckerSums:
    """Per-module sums A [r_in, r_in] and S [r_out, r_out] with position and example counts.

    `dims`: module name -> (r_in, r_out). Tensors are created on first use, on the device and
    in the dtype of what is added (float32 for a step's `pending` sums, float64 for a segment).
    """

    def __init__(self, dims: dict[str, tuple[int, int]], dtype: torch.dtype = torch.float64):
        self.dims = dict(dims)
        self.dtype = dtype
        self.activations: dict[str, torch.Tensor] = {}  # A sums
        self.gradients: dict[str, torch.Tensor] = {}  # S sums
        self.positions: dict[str, torch.Tensor] = {}  # 0-d float64 counts (no device sync)
        self.examples = 0

    def _zeros(self, name: str, device: torch.device) -> None:
        r_in, r_out = self.dims[name]
        self.activations[name] = torch.zeros(r_in, r_in, dtype=self.dtype, device=device)
        self.gradients[name] = torch.zeros(r_out, r_out, dtype=self.dtype, device=device)
        self.positions[name] = torch.zeros((), dtype=torch.float64, device=device)

    def add_positions(
        self,
        name: str,
        x_proj: torch.Tensor,
        g_proj: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        inputs: bool = True,
    ) -> None:
        """Add one backward call of module `name`.

        x_proj [B, T, r_in]: projected inputs as the capture holds them (padded positions
        already zero, multiplied by `scale`); g_proj [B, T, r_out]: projected output gradients
        of the loss as reduced by the loop; mask [B, T] (1 = real position) or None;
        scale: B for a mean-reduced loss (undone here: A gets 1/scale², S gets scale²);
        inputs=False adds S only (A and the positions were added by an earlier backward of the
        same forward pass, as in the true-Fisher pass's one backward per class).
        """
        if name not in self.activations:
            self._zeros(name, x_proj.device)
        g = g_proj if mask is None else g_proj * mask.unsqueeze(-1)
        g = g.reshape(-1, g.shape[-1])
        self.gradients[name].addmm_(g.T, g, alpha=scale**2)
        if inputs:
            x = x_proj.reshape(-1, x_proj.shape[-1])
            self.activations[name].addmm_(x.T, x, alpha=1.0 / scale**2)
            self.positions[name] += mask.sum() if mask is not None else x.shape[0]

    def commit(self, into: KroneckerSums, examples: int, gradient_scale: float = 1.0) -> None:
        """Add these sums (a step's) to `into` (a segment's) with `examples` rows; the S sums
        multiplied by `gradient_scale` (the square of a scale applied to the step's rows)."""
        for name in list(self.activations):
            device = self.activations[name].device
            if name not in into.activations:
                into._zeros(name, device)
            elif into.activations[name].device != device:  # sums read from disk: move them once
                for sums in (into.activations, into.gradients, into.positions):
                    sums[name] = sums[name].to(device)
            into.activations[name] += self.activations[name].to(into.dtype)
            into.gradients[name] += self.gradients[name].to(into.dtype) * gradient_scale
            into.positions[name] += self.positions[name]
        into.examples += int(examples)

    def is_finite(self) -> bool:
        """Whether every sum is free of NaN/inf (one device sync)."""
        parts = [t.isfinite().all() for t in (*self.activations.values(), *self.gradients.values())]
        return bool(torch.stack(parts).all()) if parts else True

    def reset(self) -> None:
        for name in self.activations:
            self.activations[name].zero_()
            self.gradients[name].zero_()
            self.positions[name].zero_()
        self.examples = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        """`{"<module>.A": [r_in, r_in], "<module>.S": [r_out, r_out]}` float64 on the CPU, for
        every module in `dims` (zeros for a module that never received a gradient)."""
        out = {}
        for name, (r_in, r_out) in self.dims.items():
            if name in self.activations:
                out[f"{name}.A"] = self.activations[name].to("cpu", torch.float64)
                out[f"{name}.S"] = self.gradients[name].to("cpu", torch.float64)
            else:
                out[f"{name}.A"] = torch.zeros(r_in, r_in, dtype=torch.float64)
                out[f"{name}.S"] = torch.zeros(r_out, r_out, dtype=torch.float64)
        return out

    def position_counts(self) -> dict[str, int]:
        return {
            name: round(float(self.positions[name])) if name in self.positions else 0 for name in self.dims
        }

    def load(self, tensors: dict[str, torch.Tensor], positions: dict[str, int], examples: int) -> None:
        """Start from sums read back from disk (a resumed run appending to a segment)."""
        for name in self.dims:
            if f"{name}.A" in tensors:
                self.activations[name] = tensors[f"{name}.A"].to(self.dtype).clone()
                self.gradients[name] = tensors[f"{name}.S"].to(self.dtype).clone()
                self.positions[name] = torch.tensor(float(positions.get(name, 0)), dtype=torch.float64)
        self.examples = int(examples)


class FactorSink(Sink):
    """Adds every backward call of a block to `sums` (a step's float32 `KroneckerSums`).
    `inputs_once`: A and the positions only at the first backward of each forward call (the
    true-Fisher pass backpropagates one forward many times; S gets every pass)."""

    def __init__(self, sums: KroneckerSums, inputs_once: bool = False):
        self.sums = sums
        self.inputs_once = inputs_once

    def backward(
        self,
        capture: ModuleCapture,
        block: CaptureBlock,
        call: ForwardCall,
        g_proj: torch.Tensor | None,
        grad: torch.Tensor,
    ) -> None:
        mask = position_mask(block.mask, capture.module, capture.name, g_proj)
        self.sums.add_positions(
            capture.name,
            call.x_proj,
            g_proj,
            mask,
            block.grad_scale,
            inputs=not self.inputs_once or call.backwards == 0,
        )
