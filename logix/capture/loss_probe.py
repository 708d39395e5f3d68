"""The automatic check of the loop's loss reduction, on the first block of a run.

Rows are exact per-example gradients only when the loss the loop backpropagates weights each
example the way `capture.loss_reduction` says: the mean over the batch (1/B, which the hooks
undo) or the sum of per-example losses, each of which may sum or average over its own tokens.
A sum under the default `mean` makes every row B× too large; a mean over every token of the
batch weights each sequence by its token share. Neither raises anywhere, so the first block
checks it, from what backward hands the watched modules (no logits or loss needed):

For a softmax cross-entropy head, the gradient of the loop's loss at one output position
(logits z [V]) is exactly c · (softmax(z) − e_y): its target y is the one negative entry and
c is the weight the loss gives that position (1/B for a batch mean, 1/N for a token mean ...).
So each position's weight is read off its own gradient and logits (exact, up to rounding, and
verified by the residual), and the weights of an example's positions say which reduction the
loop used. Only the first block's head outputs are looked at; nothing is changed (the hooks
return nothing). A loop whose watched outputs are no cross-entropy logits cannot be checked
this way, which is said once, with the manual check that works for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from logix.capture.per_sample import layer_type
from logix.notices import warn

RTOL = 1e-3  # agreement of weights read off float32 gradients
FIT_TOL = 1e-3  # |g − c (p − e_y)| ≤ FIT_TOL |g| at a cross-entropy position
SAMPLES = 16  # positions per example (and call) whose weight is read exactly
CHUNK_ELEMENTS = 1 << 22  # positions are analysed in chunks of about this many logits


class LossReductionWarning(UserWarning):
    """The loop's loss does not weight examples as `capture.loss_reduction` says."""


class LossCheckNotice(UserWarning):
    """The automatic loss check could not tell the loop's reduction (said once per run)."""


def position_weights(
    logits: torch.Tensor, grad: torch.Tensor, tol: float = FIT_TOL
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of logits / grad [B, P, V]: the weight c [B, P] (float64) with grad =
    c (softmax(logits) − e_y), and whether that fit holds [B, P] (False where the gradient is 0,
    or is no softmax cross-entropy gradient to relative tolerance `tol`)."""
    B, P, V = grad.shape
    weights = torch.zeros(B, P, dtype=torch.float64, device=grad.device)
    fits = torch.zeros(B, P, dtype=torch.bool, device=grad.device)
    flat_z, flat_g = logits.reshape(B * P, V), grad.reshape(B * P, V)
    step = max(1, CHUNK_ELEMENTS // V)
    for start in range(0, B * P, step):
        z, g = flat_z[start : start + step].double(), flat_g[start : start + step].double()
        p = torch.softmax(z, dim=-1)
        target = g.argmin(dim=-1, keepdim=True)
        off = torch.ones_like(p).scatter_(-1, target, 0.0)
        c = (g * off).sum(-1) / (p * off).sum(-1).clamp_min(1e-300)
        residual = g - c.unsqueeze(-1) * (p - (1 - off))
        norm = g.norm(dim=-1)
        ok = (norm > 0) & (c > 0) & (residual.norm(dim=-1) <= tol * norm)
        weights.view(-1)[start : start + step] = torch.where(ok, c, torch.zeros_like(c))
        fits.view(-1)[start : start + step] = ok
    return weights, fits


@dataclass
class HeadEvidence:
    """What one watched module's outputs showed in the block, per call: which positions received
    any gradient (touched [B, P]) and, at up to SAMPLES of each example's touched positions
    spread over them, the exact position weight and whether it fits (weights, fits, sampled
    [B, SAMPLES]). Sampling keeps the check to one pass over the gradient plus a softmax over
    B · SAMPLES positions; every sampled weight is exact, and all of them must agree."""

    name: str
    nonfinite: bool = False
    rejected: bool = False  # its gradients do not sum to 0 over the last axis: no logits
    rtol: float = RTOL  # grows with the rounding of the gradients' dtype (fp16 / bf16 under autocast)
    weights: list[torch.Tensor] = field(default_factory=list)
    fits: list[torch.Tensor] = field(default_factory=list)
    sampled: list[torch.Tensor] = field(default_factory=list)
    touched: list[torch.Tensor] = field(default_factory=list)

    def add(self, logits: torch.Tensor, grad: torch.Tensor) -> None:
        B, V = grad.shape[0], grad.shape[-1]
        z, g = logits.reshape(B, -1, V), grad.detach().reshape(B, -1, V)
        if not bool(torch.isfinite(g.sum())):
            self.nonfinite = True  # an overflowed step (fp16 loss scaling): no evidence
        if g.dtype.is_floating_point:
            self.rtol = max(self.rtol, 16 * torch.finfo(g.dtype).eps, 16 * torch.finfo(z.dtype).eps)
        if self.rejected or not self._sums_to_zero(g):
            self.rejected = True  # a hidden layer: skip the softmax over its outputs
            return
        touched = (g != 0).any(-1)  # [B, P]
        rank = torch.cumsum(touched.long(), dim=1)  # [B, P]: touched positions up to here
        count = rank[:, -1:]  # [B, 1]
        wanted = torch.arange(SAMPLES, device=g.device).unsqueeze(0) * count // SAMPLES + 1  # [B, S]
        sampled = wanted <= count
        pos = torch.searchsorted(rank, wanted).clamp(max=g.shape[1] - 1)  # the wanted-th touched
        pick = pos.unsqueeze(-1).expand(-1, -1, V)
        w, ok = position_weights(z.gather(1, pick), g.gather(1, pick), self.rtol)
        self.weights.append(w.cpu())
        self.fits.append((ok & sampled).cpu())
        self.sampled.append(sampled.cpu())
        self.touched.append(touched.cpu())

    def _sums_to_zero(self, g: torch.Tensor) -> bool:
        """A cheap test on the first 256 positions: a cross-entropy gradient c (p − e_y) sums to
        0 over the classes, the gradient at a hidden layer's output does not."""
        sample = g.reshape(-1, g.shape[-1])[:256].float()
        size = sample.abs().sum(-1)
        return bool((sample.sum(-1).abs() <= self.rtol * size).all())

    def per_example(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight c_n [B] of each example's target positions, their number T_n [B]) when at
        least 90% of the sampled positions are cross-entropy positions and each example's
        weights agree; else None (not a cross-entropy head, or per-token weights)."""
        if not self.weights or self.rejected:
            return None
        w, ok, sampled = (torch.cat(t, dim=1) for t in (self.weights, self.fits, self.sampled))
        counts = torch.cat(self.touched, dim=1).sum(1)
        if not bool(sampled.any()) or int(ok.sum()) < 0.9 * int(sampled.sum()):
            return None
        c = torch.zeros(w.shape[0], dtype=torch.float64)
        for n in range(w.shape[0]):
            mine = w[n][ok[n]]
            if mine.numel() == 0:
                if counts[n] > 0:
                    return None
                continue
            c[n] = mine.median()
            if bool(((mine - c[n]).abs() > self.rtol * c[n]).any()):
                return None
        return c, counts.double()


class LossProbe:
    """Hooks on the watched Linear / Conv1D modules for one block: each output's logits and the
    gradient backward hands it go to a `HeadEvidence`. `attach` returns the handles to remove."""

    def __init__(self, modules: list[tuple[str, nn.Module]], batch_size: int):
        self.batch_size = batch_size
        self.evidence = {
            name: HeadEvidence(name) for name, m in modules if layer_type(m) in ("Linear", "Conv1D")
        }
        self._modules = [(n, m) for n, m in modules if n in self.evidence]

    def attach(self) -> list:
        return [m.register_forward_hook(partial(self._forward, name)) for name, m in self._modules]

    def _forward(self, name: str, module: nn.Module, inputs: tuple, output) -> None:
        if not (isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled()):
            return None
        if output.ndim < 2 or output.shape[0] != self.batch_size or output.shape[-1] < 2:
            return None
        logits = output.detach()
        output.register_hook(lambda g: self.evidence[name].add(logits, g))
        return None

    def nonfinite(self) -> bool:
        """Whether some output gradient held inf / NaN (the check waits for a finite block)."""
        return any(ev.nonfinite for ev in self.evidence.values())

    def best(self) -> tuple[HeadEvidence, torch.Tensor, torch.Tensor] | None:
        """The module whose outputs are cross-entropy logits with the most target positions,
        with its (c [B], T_n [B]) (see `HeadEvidence.per_example`)."""
        found = []
        for ev in self.evidence.values():
            got = ev.per_example()
            if got is not None:
                found.append((int(got[1].sum()), ev, *got))
        if not found:
            return None
        _, ev, c, counts = max(found, key=lambda f: f[0])
        return ev, c, counts


def loss_verdict(
    c: torch.Tensor,
    counts: torch.Tensor,
    reduction: str,
    grad_scale: float,
    row_scale: torch.Tensor,
    rtol: float = RTOL,
) -> tuple[str, str]:
    """("ok", "") when the rows are per-example gradients of a loss that sums or averages over
    each example's targets; ("warn", message naming the fix) when they are not; ("unknown",
    why) when the weights fit no reduction. c [B]: the weight of each example's target
    positions in the loss, counts [B]: their number (T_n), grad_scale: what the hooks undo (B
    for 'mean'), row_scale [B]: the block's `scale_rows` factors."""

    def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(((a - b).abs() <= rtol * b.abs()).all())

    keep = counts > 0
    c, counts, row_scale = c[keep], counts[keep], row_scale[keep]
    if c.numel() == 0:
        return "ok", ""
    weight = c * row_scale  # the loss's weight per target position, after the user's scale_rows
    B = float(len(keep))
    stored = weight * grad_scale  # what one target position contributes to a row
    forms = {"sum": torch.ones_like(c), "mean": 1 / counts}  # per example, over its targets
    if any(_close(stored, f) for f in forms.values()):
        return "ok", ""
    batch = {"mean": 1 / B, "sum": 1.0}
    for other in ("sum", "mean"):
        if other == reduction:
            continue
        for per, f in forms.items():
            if _close(weight, f * batch[other]):
                size = "large" if other == "sum" else "small"
                return "warn", (
                    f"the loop's loss is the {other} over the batch of per-example {per}s, but "
                    f"capture.loss_reduction is {reduction!r}: every stored row is {B:g}x too {size} "
                    f"(a row must not depend on the batch size). Set capture.loss_reduction: {other} "
                    "(or backprop logix.losses.batch_loss(per_example_losses, run))"
                )
    total = float(counts.sum())
    if _close(weight, torch.full_like(c, 1 / total)):
        return "warn", (
            f"the loop's loss is the mean over every target token of the batch ({total:g} tokens): "
            "it weights each sequence by its share of the batch's tokens, so the stored rows are "
            "no sequence's own gradient. Compute per-example losses and backprop "
            "logix.losses.batch_loss(logix.losses.next_token_loss(logits, input_ids, mask, "
            "per_example='sum' or 'mean'), run)"
        )
    for per, f in forms.items():
        alpha = stored / f
        if _close(alpha, alpha.mean().expand_as(alpha)):
            a = float(alpha.mean())
            return "warn", (
                f"the loop's loss is {a:.6g} x the {reduction} over the batch of per-example {per}s "
                f"(a loss divided by the gradient-accumulation steps, or scaled by a GradScaler?): "
                f"every stored row is {a:.6g}x the example's gradient. Undo it inside the block with "
                f"block.scale_rows({1 / a:.6g}) (for a GradScaler: 1 / scaler.get_scale()), or "
                "backprop the unscaled loss"
            )
    return "unknown", (
        "the loss weights its examples unequally (a weighted loss?), so which reduction over the "
        "batch it uses cannot be told from its gradients"
    )


def report_loss_check(
    probe: LossProbe, reduction: str, grad_scale: float, row_scale: torch.Tensor | float
) -> str:
    """After the probed block: a `LossReductionWarning` naming the fix when the loop's loss does
    not reduce as `capture.loss_reduction` says, a `LossCheckNotice` when it cannot be told;
    both attributed to the user's line. Returns the verdict ("ok", "warn" or "unknown")."""
    off = "(capture.check_loss: false turns this check off)"
    best = probe.best()
    if best is None:
        warn(
            "logix could not check the loop's loss reduction: no watched Linear output received "
            "a softmax cross-entropy gradient with one weight per example in the first block (a "
            "regression loss, label smoothing, per-token weights, an unwatched head?). Make sure "
            "the backpropagated "
            f"loss is the {reduction} over the batch of per-example losses, as "
            "capture.loss_reduction says (logix.losses.check_batch_reduction checks it from "
            f"per-example losses) {off}",
            LossCheckNotice,
        )
        return "unknown"
    ev, c, counts = best
    scale = row_scale if isinstance(row_scale, torch.Tensor) else torch.tensor(float(row_scale))
    scale = scale.detach().double().cpu().expand_as(c)
    kind, message = loss_verdict(c, counts, reduction, grad_scale, scale, ev.rtol)
    if kind == "warn":
        warn(f"logix: {message} (read off the gradients of {ev.name!r}) {off}", LossReductionWarning)
    elif kind == "unknown":
        warn(
            f"logix could not check the loop's loss reduction: {message} (at {ev.name!r}); make sure "
            f"each example's loss enters as the config's {reduction} over the batch {off}",
            LossCheckNotice,
        )
    return kind
