"""A tiny sequence model logged with K-FAC factors, and dense float64 references for it."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import logix


class SeqNet(nn.Module):
    """Linear layers over [B, T, d] with a cross-position mix, so that padded positions receive
    output gradients (the mask, not the loss, must keep them out of the factors)."""

    def __init__(self, d_in: int = 5, hidden: int = 4, classes: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h + h.mean(dim=1, keepdim=True))


def seq_loss(out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per example: CE summed over its real positions; then `reduction` over the batch."""
    ce = F.cross_entropy(out.transpose(1, 2), y, reduction="none")  # [B, T]
    per_example = (ce * mask).sum(1)
    return per_example.mean() if reduction == "mean" else per_example.sum()


def make_batches(gen: torch.Generator, sizes=(3, 2, 4), seq: int = 5, d_in: int = 5):
    """Batches (ids, x [B, T, d], y [B, T], mask [B, T]) with some padded tails."""
    batches, start = [], 0
    for b in sizes:
        x = torch.randn(b, seq, d_in, generator=gen)
        y = torch.randint(0, 3, (b, seq), generator=gen)
        lengths = torch.randint(2, seq + 1, (b,), generator=gen)
        lengths[0] = seq - 1  # at least one padded position per batch
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        batches.append((list(range(start, start + b)), x, y, mask))
        start += b
    return batches


def log_model(
    path: Path,
    model: nn.Module,
    batches,
    *,
    reduction: str = "mean",
    projection: dict | None = None,
    statistics=("raw", "kfac"),
) -> None:
    config = {
        "projection": projection or {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 1},
        "capture": {"loss_reduction": reduction},
        "curvature": {"statistics": list(statistics)},
        "store": {"shard_rows": 4},
    }
    with logix.init(path, config=config, overwrite=True) as run:
        run.watch(model)
        for ids, x, y, mask in batches:
            with run(data_id=ids, mask=mask):
                seq_loss(model(x), y, mask, reduction).backward()
            model.zero_grad()


def log_sequences(run_dir: Path, model: nn.Module, batches, config: dict):
    """Log `batches` of masked sequences (mean loss) into a new store at `run_dir`; return
    (by_id: id -> (x, y, mask), recompute: ids -> their per-token gradients from a query run),
    the pair re-ranking needs."""
    with logix.init(run_dir, config=config) as run:
        run.watch(model)
        for ids, x, y, mask in batches:
            with run(data_id=ids, mask=mask):
                seq_loss(model(x), y, mask, "mean").backward()
    by_id = {i: (x[j], y[j], mask[j]) for ids, x, y, mask in batches for j, i in enumerate(ids)}

    def recompute(ids):
        q = logix.init(run_dir, mode="query")
        q.watch(model)
        x, y, mask = (torch.stack([by_id[i][k] for i in ids]) for k in range(3))
        with q(data_id=list(ids), mask=mask, per_token=True):
            seq_loss(model(x), y, mask, "mean").backward()
        return q.token_gradients()

    return by_id, recompute


def _keep(inputs: dict, outputs: dict, name: str, module, args, output) -> None:
    inputs[name], outputs[name] = args[0], output


def reference_factors(model: nn.Module, batches, projections: dict, reduction: str = "mean"):
    """Dense A, S sums, positions per module and the example count, by hand: layer inputs from
    forward hooks, per-example output gradients from torch.autograd.grad (× B for a mean)."""
    names = ["fc1", "fc2"]
    sums = {n: [0, 0, 0] for n in names}
    examples = 0
    for _, x, y, mask in batches:
        inputs: dict = {}
        outputs: dict = {}
        handles = [getattr(model, n).register_forward_hook(partial(_keep, inputs, outputs, n)) for n in names]
        loss = seq_loss(model(x), y, mask, reduction)
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(loss, [outputs[n] for n in names])
        scale = x.shape[0] if reduction == "mean" else 1
        m = mask.double().unsqueeze(-1)
        for n, g in zip(names, grads):
            xin = torch.cat([inputs[n], torch.ones_like(inputs[n][..., :1])], dim=-1).detach().double()
            p = projections[n]
            xt = xin @ p.p_in.matrix.double().T if p.p_in.matrix is not None else xin
            gt = g.double() * scale
            gt = gt @ p.p_out.matrix.double().T if p.p_out.matrix is not None else gt
            xt, gt = (xt * m).reshape(-1, xt.shape[-1]), (gt * m).reshape(-1, gt.shape[-1])
            sums[n][0] = sums[n][0] + xt.T @ xt
            sums[n][1] = sums[n][1] + gt.T @ gt
            sums[n][2] += int(mask.sum())
        examples += x.shape[0]
    return {n: tuple(v) for n, v in sums.items()}, examples


def kron_fisher(stats, name: str) -> torch.Tensor:
    """The dense [w, w] K-FAC Fisher kron(S / N_ex, A / N_pos) of a module (row-major blocks)."""
    a = stats.tensors[f"{name}.A"] / stats.positions[name]
    s = stats.tensors[f"{name}.S"] / stats.rows
    return torch.kron(s, a)


def dense_scores(
    q: torch.Tensor, x: torch.Tensor, modules, fishers: dict, damping: float, absolute: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_m q_m (F_m + λ_m I)⁻¹ x_mᵀ with λ_m = damping · trace(F_m) / w (or absolute); also the
    block-diagonal inverse [D, D]."""
    q, x = q.double(), x.double()
    hinv = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for m in modules:
        f = fishers[m.name]
        lam = damping if absolute else damping * float(torch.trace(f)) / m.width
        hinv[m.columns, m.columns] = torch.linalg.inv(f + lam * torch.eye(m.width, dtype=torch.float64))
    return q @ hinv @ x.T, hinv


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
