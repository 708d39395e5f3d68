"""Activation checkpointing: forward hooks fire twice (the forward and its recomputation during
backward), yet each example's row is counted once and none is missed.

Reentrant checkpointing runs the first forward without grad (logix ignores it) and backpropagates
through the recomputation; non-reentrant checkpointing backpropagates through the first forward's
graph and only unpacks saved tensors from the recomputation (whose hooks never receive a
gradient). Both give the rows of the model without checkpointing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import per_example_grads, projected_rows
from torch import nn
from torch.utils.checkpoint import checkpoint

import logix


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.fc2(torch.tanh(self.fc1(h)))


class Net(nn.Module):
    """Embedding, two residual blocks (optionally checkpointed), a head: [B, T] -> [B, T, 3]."""

    def __init__(self, reentrant: bool | None = None):
        super().__init__()
        self.reentrant = reentrant  # None: no checkpointing
        self.emb = nn.Embedding(10, 6)
        self.blocks = nn.ModuleList([Block(6), Block(6)])
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        for block in self.blocks:
            h = block(h) if self.reentrant is None else checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h)


def loss_per_example(out, y):
    return F.cross_entropy(out.reshape(-1, 3), y.reshape(-1), reduction="none").reshape(y.shape).sum(1)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("attribution_only", [False, True])
def test_checkpointed_rows_equal_uncheckpointed_reference(tmp_path, reentrant, attribution_only):
    torch.manual_seed(0)
    model = Net(reentrant)
    plain = Net(None)
    plain.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    tokens, y = torch.randint(0, 10, (5, 4), generator=g), torch.randint(0, 3, (5, 4), generator=g)
    cfg = {
        "projection": {"kind": "random", "rank_in": 4, "rank_out": 3},
        "capture": {"attribution_only": attribution_only},
    }
    rows = {}
    for name, net in (("checkpointed", model), ("plain", plain)):
        with logix.init(tmp_path / name, config=cfg) as run:
            run.watch(net)
            calls: list[int] = []
            hooks = [
                m.register_forward_hook(lambda *a, seen=calls: seen.append(1)) for m in net.blocks.modules()
            ]
            with run(data_id=list(range(5))):
                loss_per_example(net(tokens), y).mean().backward()
            for h in hooks:
                h.remove()
        if name == "checkpointed":
            assert len(calls) > 6  # the recomputation really ran the blocks' forward hooks again
        rows[name] = logix.open_store(tmp_path / name).load().double()
    grads = per_example_grads(plain, lambda o, t: loss_per_example(o, t).sum(), (tokens,), y)
    want = projected_rows(plain, run.modules, run.projections, grads)
    for name, got in rows.items():
        err = (got - want).norm() / want.norm()
        assert err < 1e-5, f"{name}: relative error {err:.1e}"
    torch.testing.assert_close(rows["checkpointed"], rows["plain"], rtol=1e-6, atol=1e-8)
    for m in run.modules:  # no module silently zero (a missed row) or doubled (checked above)
        assert rows["checkpointed"][:, m.columns].abs().sum() > 0
