"""Shared set-up for the attention / tied-weight capture tests: a query-mode capture of one
batch with identity projections, and the torch.func rows of the same batch."""

from __future__ import annotations

import torch
from reference import per_example_grads, projected_rows

import logix


def captured_and_reference(tmp_path, model, inputs: tuple, targets, loss_fn, mask=None, config=None):
    """(rows [B, D] logix captured, rows [B, D] from torch.func, the module table). `loss_fn(out,
    y)` is one example's loss (or the sum of a batch's); the block backpropagates their sum."""
    cfg = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "sum"}}
    cfg.update(config or {})
    with logix.init(tmp_path / "run", config=cfg) as run:
        run.watch(model)
    query = logix.init(tmp_path / "run", mode="query")
    query.watch(model)
    batch = targets.shape[0]
    with query(data_id=list(range(batch)), mask=mask):
        loss_fn(model(*inputs), targets).backward()
    got = query.gradients().values.double()
    grads = per_example_grads(model, loss_fn, inputs, targets)
    want = projected_rows(model, query.modules, query.projections, grads)
    modules = query.modules
    query.finalize()
    return got, want, modules


def assert_rows_match(got: torch.Tensor, want: torch.Tensor, modules) -> None:
    """Every module's columns equal the reference, and none is all zeros."""
    for m in modules:
        g, w = got[:, m.columns], want[:, m.columns]
        assert w.abs().max() > 0, f"reference gradient of {m.name} is zero: the test would not see a miss"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda s, m=m: f"{m.name}: {s}")
