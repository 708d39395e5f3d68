"""run.watch(model, optimizer=opt): rows are logged and the trajectory recorded in one loop."""

from __future__ import annotations

import torch
from unroll_helpers import STEPS, data, examples, loss_fn, make_model, queries, train

import logix


def test_run_records_the_trajectory_next_to_its_rows(tmp_path):
    x, y, _, _ = data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    run = logix.init(tmp_path / "run", config={"projection": {"kind": "identity"}})
    run.watch(model, optimizer=opt, trajectory_every=2)
    for t, blocks in enumerate(STEPS):
        for ids in blocks:
            with run(data_id=[t * 100 + i for i in ids]):  # ids unique per store segment
                loss_fn(model, (x[ids], y[ids])).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    run.finalize()
    assert len(logix.open_store(tmp_path / "run")) == sum(len(b) for s in STEPS for b in s)

    train("sgd", record=str(tmp_path / "alone"), every=2)  # the same training, recording only
    alone = logix.unroll.unroll(
        tmp_path / "alone", make_model(), loss_fn, examples, queries(), progress=False
    )
    logged = logix.unroll.unroll(
        tmp_path / "run",
        make_model(),
        loss_fn,
        lambda ids: examples([i % 100 for i in ids]),
        queries(),
        progress=False,
    )
    # each id is step*100 + example: summing an example's columns gives its total effect
    total = torch.zeros_like(alone.values)
    for j, i in enumerate(logged.train_ids):
        total[:, i % 100] += logged.values[:, j]
    torch.testing.assert_close(total, alone.values, rtol=1e-10, atol=1e-14)
