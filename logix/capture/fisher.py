"""Pseudo-gradients of the true Fisher (the Gauss–Newton matrix) of a cross-entropy loss.

For logits z with p = softmax(z), the Fisher under the model's own distribution is

    F = Σ_n E_{y~p_n}[g_n(y) g_n(y)ᵀ] = Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n,   J_n = ∂z_n/∂θ.

With ℓ_c = √p_c (e_c − p) we have Σ_c ℓ_c ℓ_cᵀ = diag p − p pᵀ, so backpropagating the logit
gradient ℓ_c gives a "pseudo-gradient" G̃_{n,c} with F = Σ_{n,c} G̃_{n,c} G̃_{n,c}ᵀ: exact and
deterministic, one backward pass per class slot.

Sequences (logits [B, T, V], one cross-entropy per target position): under the model the labels
of different positions are independent and E[g_t] = 0, so F = Σ_n Σ_t E_{y_t}[g_t g_tᵀ]. Each pass
backpropagates ℓ at one position t for every example of the batch: T·K passes for K class slots.

Top-mass truncation (`mass` < 1): per position, the most probable classes are kept until their
probability reaches `mass`; the rest are dropped, not renormalised. The kept terms are an exact
partial sum of the Fisher (a PSD lower bound that grows monotonically to the full one as `mass`
→ 1), and what is dropped is reported (`dropped_mass`, and `dropped_trace`: the share of
trace(diag p − ppᵀ) that is lost, which is the larger of the two for confident predictions).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from logix.errors import CaptureError


class FisherLogitGrads:
    """The logit-gradients ℓ of one batch, one tensor shaped like `logits` per backward pass.

    logits: [B, C] (classification) or [B, T, V] (a cross-entropy at every position t).
    mask: logits.shape[:-1]; 0 where a position (or example) is not a target of the loss, 1
    where it is; other values weight that position's loss (e.g. 1/length for a per-example
    mean over tokens), which scales its ℓ by the same factor. mass: in (0, 1], see module doc.
    """

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor | None = None, mass: float = 1.0):
        if logits.ndim not in (2, 3):
            raise ValueError(
                f"logits must be [batch, classes] or [batch, seq, vocab], got {tuple(logits.shape)}"
            )
        if not 0.0 < float(mass) <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        if mask is not None and tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"mask must have the shape of logits without the class dimension, "
                f"{tuple(logits.shape[:-1])}, got {tuple(mask.shape)}"
            )
        self.shape = logits.shape
        self.dtype = logits.dtype
        self.device = logits.device
        z = logits.detach().to(torch.float64)
        z = z if z.ndim == 3 else z.unsqueeze(1)  # [B, T, C]
        self.probs = torch.softmax(z, dim=-1)
        classes = z.shape[-1]
        weight = torch.ones(z.shape[:2], dtype=torch.float64, device=z.device)
        if mask is not None:
            weight = mask.detach().to(device=z.device, dtype=torch.float64).reshape(z.shape[:2])
        self.weight = weight  # [B, T]
        if float(mass) >= 1.0:
            self.order = torch.arange(classes, device=z.device).expand(z.shape).contiguous()
            self.keep = torch.full(z.shape[:2], classes, dtype=torch.long, device=z.device)
        else:
            sorted_p, self.order = torch.sort(self.probs, dim=-1, descending=True, stable=True)
            # keep the fewest leading classes whose probabilities sum to at least `mass`
            below = (torch.cumsum(sorted_p, dim=-1) < float(mass)).sum(dim=-1)
            self.keep = (below + 1).clamp(max=classes)
        active = weight != 0
        self.keep = torch.where(active, self.keep, torch.zeros_like(self.keep))
        # What is left out, summed over the dropped classes (exactly 0 when none is dropped).
        slots = torch.arange(classes, device=z.device)
        p_sorted = self.probs.gather(-1, self.order)
        dropped = torch.where(slots >= self.keep.unsqueeze(-1), p_sorted, torch.zeros_like(p_sorted))
        p2 = (self.probs * self.probs).sum(-1, keepdim=True)
        full_trace = 1.0 - p2.squeeze(-1)  # trace(diag p − ppᵀ) = Σ_c p_c ‖e_c − p‖²
        dropped_trace = (dropped * (1.0 - 2.0 * dropped + p2)).sum(-1)
        zero = torch.zeros_like(full_trace)
        self.dropped_mass = torch.where(active, dropped.sum(-1), zero)  # [B, T]
        self.dropped_trace = torch.where(active & (full_trace > 0), dropped_trace / full_trace, zero)
        self.positions = int(active.sum())

    def __len__(self) -> int:
        """The number of backward passes: Σ_t max_n K_{n,t}."""
        return int(self.keep.max(dim=0).values.sum())

    def __iter__(self) -> Iterator[torch.Tensor]:
        batch, positions, _ = self.probs.shape
        rows = torch.arange(batch, device=self.probs.device)
        for t in range(positions):
            p = self.probs[:, t]  # [B, C]
            for k in range(int(self.keep[:, t].max())):
                c = self.order[:, t, k]  # the class of slot k, per example
                coef = p[rows, c].sqrt() * self.weight[:, t] * (k < self.keep[:, t])
                ell = -coef.unsqueeze(1) * p  # √p_c (e_c − p), scaled by the weight
                ell[rows, c] += coef
                out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
                if len(self.shape) == 3:
                    out[:, t] = ell
                else:
                    out.copy_(ell)
                yield out


def fisher_logit_grads(
    logits: torch.Tensor, mask: torch.Tensor | None = None, mass: float = 1.0
) -> FisherLogitGrads:
    """An iterable of logit-gradient tensors shaped like `logits` ([B, C] or [B, T, V]) whose
    backpropagated pseudo-gradients G̃ satisfy Σ G̃ G̃ᵀ = the true Fisher of the batch's
    cross-entropy (exactly for mass=1). `.dropped_mass`/`.dropped_trace` [B, T] report what a
    mass below 1 leaves out; see `FisherLogitGrads`."""
    return FisherLogitGrads(logits, mask, mass)


def check_pass_logits(logits: torch.Tensor, batch_size: int, outputs: list) -> None:
    """The logits of a Fisher pass's block: one row per data id, computed from watched modules
    (whose outputs the block collected) with gradients enabled."""
    if logits.shape[0] != batch_size:
        raise CaptureError(f"logits have {logits.shape[0]} examples but data_id has {batch_size} ids")
    if not logits.requires_grad or not outputs:
        raise CaptureError(
            "no watched module took part in computing these logits: run the model's forward "
            "pass inside `with fit(data_id=...)`, with gradients enabled"
        )


def backpropagate_to(outputs: list, logits: torch.Tensor, logit_grad: torch.Tensor) -> tuple:
    """torch.autograd.grad of `logits` weighted by `logit_grad` to the watched layers' outputs
    only: the capture hooks on those outputs see the pseudo output-gradients, and no weight
    gradient is computed (parameters and their .grad stay untouched)."""
    try:
        return torch.autograd.grad([logits], outputs, [logit_grad], retain_graph=True, allow_unused=True)
    except RuntimeError as e:
        if ".grad()" not in str(e):
            raise
        raise CaptureError(
            "a Fisher pass backpropagates with torch.autograd.grad, which reentrant activation "
            "checkpointing does not support: use torch.utils.checkpoint.checkpoint(..., "
            "use_reentrant=False) (or none) for this pass"
        ) from e
