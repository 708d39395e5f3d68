"""Functional, differentiable versions of torch.optim.SGD, Adam and AdamW.

Each `step` returns new tensors instead of updating in place, so `torch.func.vjp` can run
backwards through it; the arithmetic follows torch.optim's single-tensor code operation by
operation, so a replay reproduces the recorded training to float rounding. Step counts and
"does the momentum buffer exist yet" are plain Python values advanced by `advance`.
"""

from __future__ import annotations

from typing import Any

import torch

from logix.vocabulary import OPTIMIZER_KINDS, check_choice

Tensors = tuple[torch.Tensor, ...]
State = dict[str, Tensors]


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """√v with derivative 0 where v == 0 (a parameter whose gradient has always been exactly 0),
    where plain sqrt would give inf · 0 = NaN."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


class FunctionalOptimizer:
    """One optimizer kind: `state_keys` name its per-parameter state tensors."""

    def __init__(self, kind: str):
        self.kind = check_choice(kind, OPTIMIZER_KINDS, "optimizer kind")
        self.state_keys = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")

    def step(
        self,
        params: Tensors,
        state: State,
        grads: Tensors,
        hps: list[dict[str, Any]],
        counts: list[int],
        initialised: list[bool],
    ) -> tuple[Tensors, State]:
        """One update of every parameter i with its group's hyperparameters hps[i]."""
        if self.kind == "sgd":
            return self._sgd(params, state, grads, hps, initialised)
        return self._adam(params, state, grads, hps, counts)

    def advance(
        self, hps: list[dict[str, Any]], counts: list[int], initialised: list[bool]
    ) -> tuple[list[int], list[bool]]:
        """The Python-side state after one step: counts + 1, buffers created where momentum ≠ 0."""
        if self.kind == "sgd":
            return counts, [init or h["momentum"] != 0 for init, h in zip(initialised, hps)]
        return [c + 1 for c in counts], [True] * len(counts)

    @staticmethod
    def _sgd(params, state, grads, hps, initialised):
        new_params, new_bufs = [], []
        for p, g, buf, h, init in zip(params, grads, state["momentum_buffer"], hps, initialised):
            if h["weight_decay"] != 0:
                g = g.add(p, alpha=h["weight_decay"])
            if h["momentum"] != 0:
                buf = buf.mul(h["momentum"]).add(g, alpha=1 - h["dampening"]) if init else g
                g = g.add(buf, alpha=h["momentum"]) if h["nesterov"] else buf
            new_params.append(p.add(g, alpha=-h["lr"]))
            new_bufs.append(buf)
        return tuple(new_params), {"momentum_buffer": tuple(new_bufs)}

    def _adam(self, params, state, grads, hps, counts):
        new_params, new_m, new_v = [], [], []
        for p, g, m, v, h, count in zip(params, grads, state["exp_avg"], state["exp_avg_sq"], hps, counts):
            lr, (beta1, beta2), wd = h["lr"], h["betas"], h["weight_decay"]
            step = count + 1
            if wd != 0:
                if self.kind == "adamw":
                    p = p.mul(1 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            m = m.lerp(g, 1 - beta1)
            v = v.mul(beta2).addcmul(g, g, value=1 - beta2)
            step_size = lr / (1 - beta1**step)
            denom = (_safe_sqrt(v) / (1 - beta2**step) ** 0.5).add(h["eps"])
            new_params.append(p.addcdiv(m, denom, value=-step_size))
            new_m.append(m)
            new_v.append(v)
        return tuple(new_params), {"exp_avg": tuple(new_m), "exp_avg_sq": tuple(new_v)}
