"""Recording a trajectory: functional optimizers vs torch.optim, recording leaves training
unchanged, clear errors for mismatches, crash safety, damaged files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from unroll_helpers import OPTIMIZERS, examples, loss_fn, make_model, queries, train

import logix
from logix.store.trajectory import Trajectory, checkpoint_name
from logix.unroll import FunctionalOptimizer

KIND_OF = {"sgd": "sgd", "nesterov": "sgd", "adam": "adam", "adamw": "adamw"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_functional_optimizers_match_torch_optim_step_for_step(name, dtype):
    model = make_model(dtype)
    opt = OPTIMIZERS[name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    fopt = FunctionalOptimizer(KIND_OF[name])
    params = tuple(p.detach().clone() for p in model.parameters())
    state = {k: tuple(torch.zeros_like(p) for p in params) for k in fopt.state_keys}
    counts, init = [0] * len(params), [False] * len(params)
    gen = torch.Generator().manual_seed(3)
    for _ in range(7):
        grads = tuple(torch.randn(p.shape, generator=gen, dtype=dtype) for p in params)
        group = opt.param_groups[0]
        hps = [{k: (list(v) if k == "betas" else v) for k, v in group.items() if k != "params"}] * len(params)
        params, state = fopt.step(params, state, grads, hps, counts, init)
        counts, init = fopt.advance(hps, counts, init)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
        for mine, theirs in zip(params, model.parameters()):
            rtol = 1e-6 if dtype == torch.float32 else 1e-13
            torch.testing.assert_close(mine, theirs.detach(), rtol=rtol, atol=0)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_recording_does_not_change_training(tmp_path, kind):
    plain, recorded = train(kind), train(kind, record=str(tmp_path / "r"))
    for a, b in zip(plain.parameters(), recorded.parameters()):
        assert torch.equal(a, b)
    traj = Trajectory(tmp_path / "r")
    assert traj.complete and traj.n_steps == 6 and traj.checkpoint_steps == [0, 2, 4, 6]
    final = traj.checkpoint(6)
    for n, p in recorded.named_parameters():
        assert torch.equal(final.params[n], p.detach())
    steps = traj.steps()
    assert steps[1]["blocks"] == [[4, 5], [6, 7]]  # gradient accumulation: both blocks of step 1
    lrs = [s["groups"][0]["lr"] for s in steps]  # as StepLR set them
    assert lrs == pytest.approx([lrs[0], lrs[0], lrs[0] / 2, lrs[0] / 2, lrs[0] / 4, lrs[0] / 4], rel=1e-15)


def test_replay_with_another_model_or_optimizer_is_a_clear_error(tmp_path):
    train("sgd", record=str(tmp_path / "r"))
    wider = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(logix.StoreError, match="recorded as float64 \\[5, 3\\]"):
        logix.unroll.unroll(tmp_path / "r", wider, loss_fn, examples, queries(), progress=False)
    with pytest.raises(logix.StoreError, match="recorded model"):
        logix.unroll.unroll(
            tmp_path / "r", make_model(torch.float32), loss_fn, examples, queries(), progress=False
        )
    model = make_model()
    with pytest.raises(logix.StoreError, match="recorded with 'sgd', not 'adamw'"):
        logix.unroll.unroll(
            tmp_path / "r",
            model,
            loss_fn,
            examples,
            queries(),
            progress=False,
            optimizer=torch.optim.AdamW(model.parameters()),
        )
    with pytest.raises(logix.StoreError, match="does not reproduce the recorded training"):
        other = lambda ids: (examples(ids)[0] * 1.5, examples(ids)[1])  # noqa: E731  (other data)
        logix.unroll.unroll(tmp_path / "r", model, loss_fn, other, queries(), progress=False)


def test_unsupported_optimizers_and_randomness_are_refused(tmp_path):
    model = make_model()
    with pytest.raises(logix.ConfigError, match="RMSprop"):
        logix.record_trajectory(tmp_path / "a", model, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(logix.ConfigError, match="amsgrad"):
        logix.record_trajectory(tmp_path / "b", model, torch.optim.Adam(model.parameters(), amsgrad=True))
    with pytest.raises(logix.CaptureError, match="not one of the model's"):
        logix.record_trajectory(tmp_path / "c", model, torch.optim.SGD(make_model().parameters(), lr=0.1))
    noisy = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(noisy.parameters(), lr=0.1)
    rec = logix.record_trajectory(tmp_path / "d", noisy, opt)
    with rec(data_id=[0, 1]):
        loss_fn(noisy, examples([0, 1])).mean().backward()
    with pytest.raises(logix.CaptureError, match="Dropout in training mode"):
        opt.step()
    rec2 = logix.record_trajectory(tmp_path / "e", model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(logix.CaptureError, match="no data ids since the previous step"):
        rec2.optimizer.step()


def test_a_crash_while_recording_replays_up_to_the_last_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="crash"):
        train("sgd", record=str(tmp_path / "crashed"), every=2, crash_at=5)
    traj = Trajectory(tmp_path / "crashed")
    assert not traj.complete and traj.checkpoint_steps == [0, 2, 4] and traj.n_steps == 4
    crashed = logix.unroll.unroll(
        tmp_path / "crashed", make_model(), loss_fn, examples, queries(), progress=False
    )
    # the same as a complete recording of the first four steps
    from unroll_helpers import STEPS

    train("sgd", record=str(tmp_path / "four"), every=2, steps=STEPS[:4])
    four = logix.unroll.unroll(tmp_path / "four", make_model(), loss_fn, examples, queries(), progress=False)
    assert crashed.train_ids == four.train_ids
    torch.testing.assert_close(crashed.values, four.values, rtol=1e-12, atol=0)


def test_damaged_trajectory_files_are_clear_errors(tmp_path):
    train("sgd", record=str(tmp_path / "r"))
    with pytest.raises(logix.StoreError, match="no recorded trajectory"):
        Trajectory(tmp_path / "nowhere")
    with pytest.raises(logix.StoreError, match="already holds a recorded trajectory"):
        model = make_model()
        logix.record_trajectory(tmp_path / "r", model, torch.optim.SGD(model.parameters(), lr=0.1))
    path = tmp_path / "r" / "trajectory" / checkpoint_name(2)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(logix.StoreError, match="checksum"):
        logix.unroll.unroll(tmp_path / "r", make_model(), loss_fn, examples, queries(), progress=False)
    index = tmp_path / "r" / "trajectory" / "index.json"
    doc = json.loads(index.read_text())
    doc["checkpoints"][0]["step"] = "../../etc"
    index.write_text(json.dumps(doc))
    with pytest.raises(logix.StoreError, match="non-negative integer"):
        Trajectory(tmp_path / "r")
