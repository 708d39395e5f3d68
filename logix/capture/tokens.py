"""Per-position projected factors: the capture behind token-level attribution.

A sequence's projected gradient is a sum over its positions, G̃_n = Σ_t g̃_t x̃_tᵀ per module, so
its influence on a query splits exactly into one term per position. A per-token block
(`with query(data_id=ids, mask=mask, per_token=True): loss.backward()`) keeps the factors
x̃ [B, T, r_in] and g̃ [B, T, r_out] of each watched module instead of summing them;
`query.token_gradients()` returns them as `TokenGradients` for `InfluenceEngine.token_scores`.
The factors are exactly those the summing capture uses (mask, bias column and the loss-reduction
rescale included), so Σ_t over them is the row a logging pass stores.

A module reached by several backward passes (or called several times in one forward) gives one
factor pair per pass; pairs are stacked on an axis K and their contributions add up per position.
An `Embedding` kept whole (identity projection) has one-hot x̃: it is kept as the token index and
its weight (mask × scale), never as a [B, T, vocab] tensor, and scored by a column gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from logix.capture.hooks import CaptureBlock, ForwardCall, ModuleCapture, Sink
from logix.errors import CaptureError
from logix.store.format import ModuleInfo
from logix.store.gradients import Gradients
from logix.store.ids import DataId


@dataclass
class PositionFactors:
    """One module's per-position factors for n sequences.

    g: [n, K, T, r_out]; dense x: [n, K, T, r_in]; or, for a one-hot input (an Embedding kept
    whole), index [n, K, T] int64 and weight [n, K, T] with x̃ = weight · e_index. K counts the
    backward passes that reached the module; zero padding (in K or T) contributes nothing.
    """

    g: torch.Tensor
    x: torch.Tensor | None = None
    index: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    r_in: int = 0

    @property
    def positions(self) -> int:
        return self.g.shape[2]

    @property
    def one_hot(self) -> bool:
        return self.x is None

    def sequence_gradient(self) -> torch.Tensor:
        """Σ_k Σ_t g̃ x̃ᵀ per sequence: [n, r_out, r_in] float32 (the row a logging pass stores)."""
        n, k, t, r_out = self.g.shape
        g = self.g.reshape(n, k * t, r_out)
        if self.x is not None:
            return torch.bmm(g.transpose(1, 2), self.x.reshape(n, k * t, -1))
        out = g.new_zeros(n, r_out, self.r_in)
        weighted = (g * self.weight.reshape(n, k * t, 1)).transpose(1, 2)  # [n, r_out, K·T]
        index = self.index.reshape(n, 1, k * t).expand(n, r_out, k * t)
        return out.scatter_add_(2, index, weighted)

    def dense(self) -> PositionFactors:
        """The same factors with a dense x [n, K, T, r_in] (for one-hot lookups mixed with dense
        uses of one tied table)."""
        if not self.one_hot:
            return self
        x = torch.nn.functional.one_hot(self.index, self.r_in).float() * self.weight[..., None]
        return PositionFactors(self.g, x, r_in=self.r_in)

    def padded(self, k: int, t: int) -> PositionFactors:
        """Zero-padded to K = k passes and T = t positions."""

        def pad(v: torch.Tensor | None, dims: int) -> torch.Tensor | None:
            if v is None:
                return None
            extra = (0, 0) * dims + (0, t - v.shape[2], 0, k - v.shape[1])
            return torch.nn.functional.pad(v, extra)

        return PositionFactors(
            pad(self.g, 1), pad(self.x, 1), pad(self.index, 0), pad(self.weight, 0), self.r_in
        )

    def select(self, rows: torch.Tensor) -> PositionFactors:
        pick = lambda v: None if v is None else v[rows]
        return PositionFactors(self.g[rows], pick(self.x), pick(self.index), pick(self.weight), self.r_in)

    @staticmethod
    def concatenate(parts: Sequence[PositionFactors]) -> PositionFactors:
        k = max(p.g.shape[1] for p in parts)
        t = max(p.positions for p in parts)
        parts = [p.padded(k, t) for p in parts]
        return PositionFactors(
            *(_stack([getattr(p, key) for p in parts], dim=0) for key in ("g", "x", "index", "weight")),
            r_in=parts[0].r_in,
        )


@dataclass
class TokenGradients:
    """Per-position projected gradients of n sequences, for `InfluenceEngine.token_scores`.

    factors: per module name, its `PositionFactors` (T is the module's own positions: tokens for
    Linear / Embedding layers of a sequence model, output pixels for Conv2d); mask: the [n, T]
    padding mask given at capture (None if none was); token_ids: [n, T] as given at capture
    (-1 where a shorter batch was padded), or None.
    """

    data_ids: list[DataId]
    modules: list[ModuleInfo]
    fingerprint: str
    factors: dict[str, PositionFactors]
    mask: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.data_ids)

    def gradients(self) -> Gradients:
        """The sequences' projected gradients summed over positions: rows [n, D]."""
        width = sum(m.width for m in self.modules)
        rows = torch.zeros(len(self), width)
        for m in self.modules:
            if m.name in self.factors:
                rows[:, m.columns] = self.factors[m.name].sequence_gradient().reshape(len(self), -1)
        return Gradients(rows, list(self.data_ids), list(self.modules), self.fingerprint)

    def select(self, index: Sequence[int]) -> TokenGradients:
        """A subset of the sequences, in the order of `index`."""
        rows = torch.as_tensor(list(index), dtype=torch.long)
        pick = lambda v: None if v is None else v[rows]
        return TokenGradients(
            [self.data_ids[i] for i in rows.tolist()],
            self.modules,
            self.fingerprint,
            {k: f.select(rows) for k, f in self.factors.items()},
            pick(self.mask),
            pick(self.token_ids),
        )

    @staticmethod
    def concatenate(parts: Sequence[TokenGradients]) -> TokenGradients:
        """One TokenGradients from several per-token blocks (T padded with zeros to the longest)."""
        first = parts[0]
        names = [m.name for m in first.modules if any(m.name in p.factors for p in parts)]
        factors = {}
        for name in names:
            r_out, r_in = next((m.r_out, m.r_in) for m in first.modules if m.name == name)
            pieces = [
                p.factors[name]
                if name in p.factors
                else _empty(len(p), r_out, r_in, _one_hot_like(parts, name))
                for p in parts
            ]
            factors[name] = PositionFactors.concatenate(pieces)
        return TokenGradients(
            [i for p in parts for i in p.data_ids],
            first.modules,
            first.fingerprint,
            factors,
            _cat_padded([p.mask for p in parts], 0),
            _cat_padded([p.token_ids for p in parts], -1),
        )


def _stack(tensors: list[torch.Tensor | None], dim: int = 1) -> torch.Tensor | None:
    """torch.cat along `dim` (K for passes, 0 for sequences); None for an absent field."""
    return None if tensors[0] is None else torch.cat(tensors, dim=dim)


def _one_hot_like(parts: Sequence[TokenGradients], name: str) -> bool:
    return next(p.factors[name].one_hot for p in parts if name in p.factors)


def _empty(n: int, r_out: int, r_in: int, one_hot: bool) -> PositionFactors:
    """No pass reached the module in this block: K = 0."""
    g = torch.zeros(n, 0, 1, r_out)
    if one_hot:
        return PositionFactors(g, None, torch.zeros(n, 0, 1, dtype=torch.long), torch.zeros(n, 0, 1), r_in)
    return PositionFactors(g, torch.zeros(n, 0, 1, r_in), r_in=r_in)


def _cat_padded(tensors: list[torch.Tensor | None], fill: int) -> torch.Tensor | None:
    if all(t is None for t in tensors):
        return None
    if any(t is None for t in tensors):
        raise ValueError(
            "some per-token blocks were given a mask (or token_ids) and others were "
            "not: pass them in every per_token block or in none"
        )
    length = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, length - t.shape[1]), value=fill) for t in tensors])


class TokenSink(Sink):
    """Collects the factor pairs of one per-token block instead of summing them into rows."""

    def __init__(self) -> None:
        self.passes: dict[str, list[PositionFactors]] = {}

    def backward(
        self,
        capture: ModuleCapture,
        block: CaptureBlock,
        call: ForwardCall,
        g_proj: torch.Tensor | None,
        grad: torch.Tensor,
    ) -> None:
        """One backward pass reached `capture`'s module: x̃ [B, T, r_in], g̃ [B, T, r_out]."""
        x_proj = call.x_proj
        g = g_proj.detach().float().cpu()[:, None]
        if isinstance(capture.module, nn.Embedding) and capture.projection.p_in.matrix is None:
            # One-hot x̃ = weight · e_index (weight: mask, padding index, scale): keep the pair.
            index = x_proj.argmax(dim=-1)
            weight = x_proj.gather(-1, index[..., None])[..., 0]
            factors = PositionFactors(
                g, None, index.cpu()[:, None], weight.detach().float().cpu()[:, None], capture.r_in
            )
        else:
            factors = PositionFactors(g, x_proj.detach().float().cpu()[:, None], r_in=capture.r_in)
        self.passes.setdefault(capture.name, []).append(factors)

    def finish(
        self,
        ids: list[DataId],
        modules: list[ModuleInfo],
        fingerprint: str,
        mask: torch.Tensor | None,
        token_ids: torch.Tensor | None,
    ) -> TokenGradients:
        """The block's TokenGradients: each module's passes stacked on K."""
        if not self.passes:
            raise CaptureError(
                "no gradient reached any watched module inside `with run(data_id=..., "
                "per_token=True)`: call loss.backward() inside the block (with gradients enabled)"
            )
        factors = {}
        for name, passes in self.passes.items():
            if len({p.one_hot for p in passes}) > 1:  # a tied table: its lookups and a head's uses
                passes = [p.dense() for p in passes]
            t = max(p.positions for p in passes)
            padded = [p.padded(1, t) for p in passes]
            factors[name] = PositionFactors(
                *(_stack([getattr(p, key) for p in padded]) for key in ("g", "x", "index", "weight")),
                r_in=padded[0].r_in,
            )
        return TokenGradients(
            ids,
            modules,
            fingerprint,
            factors,
            None if mask is None else mask.detach().cpu().float(),
            None if token_ids is None else token_ids.detach().cpu().long(),
        )


def check_token_request(
    mode: str, batch: int, mask: torch.Tensor | None, per_token: bool, token_ids: torch.Tensor | None
) -> None:
    """Validate the per-token arguments of `run(data_id=..., per_token=..., token_ids=...)`."""
    if per_token and mode != "query":
        raise ValueError(
            "per_token=True is for query-mode runs (logix.init(run_dir, mode='query')): "
            "recompute the per-token factors of the documents you want to inspect"
        )
    if token_ids is None:
        return
    if not per_token:
        raise ValueError("token_ids are kept only with per_token=True")
    if token_ids.ndim != 2 or token_ids.shape[0] != batch:
        raise ValueError(f"token_ids must be [batch={batch}, seq], got {tuple(token_ids.shape)}")
    if mask is not None and token_ids.shape != mask.shape:
        raise ValueError(
            f"token_ids {tuple(token_ids.shape)} and mask {tuple(mask.shape)} must have the same shape"
        )
