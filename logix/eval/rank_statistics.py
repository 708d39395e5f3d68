"""Rank statistics of the LDS: average ranks, Spearman correlation, and a bootstrap interval of a mean."""

from __future__ import annotations

import torch


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given the average of the ranks they span: [n] float64.

    rankdata([10, 20, 20, 5]) = [2, 3.5, 3.5, 1].
    """
    x = torch.as_tensor(x)
    if x.ndim != 1:
        raise ValueError(f"rankdata takes a 1-D tensor, got shape {tuple(x.shape)}")
    n = x.numel()
    order = torch.argsort(x, stable=True)
    xs = x[order]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = xs[1:] != xs[:-1]
    group = torch.cumsum(starts.long(), dim=0) - 1  # group index of each sorted position
    positions = torch.arange(1, n + 1, dtype=torch.float64)
    n_groups = int(group[-1]) + 1 if n else 0
    total = torch.zeros(n_groups, dtype=torch.float64).scatter_add_(0, group, positions)
    count = torch.bincount(group, minlength=n_groups).to(torch.float64)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = (total / count)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of the columns of a and b: [M, k] × [M, k] -> [k] float64.

    The Pearson correlation of the average ranks (ties handled as in `rankdata`); NaN for a
    column where either side is constant (the correlation is undefined there). 1-D inputs are
    treated as one column and give a 0-D result.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    one = a.ndim == 1
    if one:
        a, b = a[:, None], b[:, None]
    ra = torch.stack([rankdata(a[:, i]) for i in range(a.shape[1])], dim=1)
    rb = torch.stack([rankdata(b[:, i]) for i in range(b.shape[1])], dim=1)
    ra = ra - ra.mean(dim=0)
    rb = rb - rb.mean(dim=0)
    denom = (ra.square().sum(dim=0) * rb.square().sum(dim=0)).sqrt()
    rho = torch.where(denom > 0, (ra * rb).sum(dim=0) / denom, torch.full_like(denom, float("nan")))
    return rho[0] if one else rho


def bootstrap_ci(
    values: torch.Tensor, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` [n] (NaNs dropped)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    if v.numel() == 1:
        return float(v[0]), float(v[0])
    gen = torch.Generator().manual_seed(int(seed))
    means = v[torch.randint(0, v.numel(), (n_boot, v.numel()), generator=gen)].mean(dim=1)
    tail = (1.0 - level) / 2.0
    q = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(q[0]), float(q[1])
