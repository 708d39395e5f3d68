"""Resuming a run that records a trajectory (issue #19, finding 1): the trajectory continues
from its last complete step, never reset; the resumed training is checked against that step's
checkpoint; the final store and replay equal a clean run's."""

from __future__ import annotations

import pytest
import torch
from child_process import run_python
from resume_helpers import EVERY, OPTIMIZERS, STEPS, make_model, replay, step_ids, train

import logix
from logix.errors import CaptureError, StoreError
from logix.store.trajectory import Trajectory

DIE = """
import sys
from resume_helpers import train
flush_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
train(sys.argv[1], die_at=int(sys.argv[3]), flush_at=flush_at, optimizer=sys.argv[2])
"""


def _rows(run_dir) -> dict:
    store = logix.open_store(run_dir, verify="full")
    ids = store.data_ids
    assert len(ids) == len(set(ids)), "an id is stored twice"
    rows = store.load()
    return {i: rows[k] for k, i in enumerate(ids)}


def _check_equal_to_clean(run_dir, clean_dir):
    got, clean = _rows(run_dir), _rows(clean_dir)
    assert sorted(got) == sorted(clean) == sorted(i for t in range(STEPS) for i in step_ids(t))
    for i in clean:
        assert torch.equal(got[i], clean[i]), i
    traj = Trajectory(run_dir)
    assert traj.complete and traj.n_steps == STEPS
    assert [s["blocks"] for s in traj.steps()] == [[step_ids(t)] for t in range(STEPS)]
    ref = replay(clean_dir)
    scores = replay(run_dir)
    assert scores.train_ids == ref.train_ids
    torch.testing.assert_close(scores.values, ref.values, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("die_at, flush_at, optimizer", [(5, None, "sgd"), (5, 3, "sgd"), (5, 3, "adam")])
def test_resume_continues_the_trajectory_from_its_last_complete_step(tmp_path, die_at, flush_at, optimizer):
    """die_at=5: steps 0-3 are in files and checkpoint 4 is written, no row is on disk: the
    resume goes back to step 0 (the rows of steps before a checkpoint must be stored for it to
    count). flush_at=3: rows of steps 0-2 are on disk but steps 3-4 are lost with the kill:
    checkpoint 4 does not count (step 3's rows are missing), the resume trains from step 2,
    and step 2's rows, already stored, are not written again. Adam: its moments and step counts
    are restored too."""
    clean_dir = tmp_path / "clean"
    train(clean_dir, optimizer=optimizer)
    run_dir = tmp_path / "run"
    args = [str(run_dir), optimizer, str(die_at)] + ([str(flush_at)] if flush_at is not None else [])
    proc = run_python("-c", DIE, *args)
    assert proc.returncode == 9, proc.stderr.decode()
    assert Trajectory(run_dir).checkpoint_steps == [0, 2, 4]

    run = logix.init(run_dir, resume=True)
    model = make_model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    with pytest.warns(UserWarning, match="trajectory"):
        run.watch(model, optimizer=opt, trajectory_every=EVERY)
    expected = 2 if flush_at == 3 else 0
    assert run.trajectory_step == expected
    assert Trajectory(run_dir).checkpoint_steps == list(range(0, expected + 1, EVERY))  # nothing reset
    run.finalize()  # not trained: the trajectory stays as it was

    with pytest.warns(UserWarning, match=f"continues from step {expected}"):
        train(run_dir, resume=True, optimizer=optimizer)  # the recipe: restore the state, train on
    _check_equal_to_clean(run_dir, clean_dir)


def test_resume_after_a_clean_finish_appends_steps(tmp_path):
    """A finished run resumed to train more keeps its steps (old main deleted them)."""
    run_dir = tmp_path / "run"
    train(run_dir)
    run = logix.init(run_dir, resume=True)
    model = make_model()
    with pytest.warns(UserWarning, match=f"continues from step {STEPS}"):
        run.watch(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert run.trajectory_step == STEPS
    assert Trajectory(run_dir).n_steps == STEPS
    run.finalize()
    assert Trajectory(run_dir).n_steps == STEPS


@pytest.mark.slow
def test_resumed_training_that_does_not_start_from_the_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    assert run_python("-c", DIE, str(run_dir), "sgd", "5", "5").returncode == 9
    run = logix.init(run_dir, resume=True)
    model = make_model()  # the weights of step 0, not of step 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="continues from step 4"):
        run.watch(model, optimizer=opt, trajectory_every=EVERY)
    assert run.trajectory_step == 4
    with pytest.raises(CaptureError, match="restore_trajectory"):
        with run(data_id=step_ids(4)):  # refused before any row is logged
            model(torch.zeros(3, 3, dtype=torch.float64)).sum().backward()
    assert run.restore_trajectory() == 4  # the fix
    with run(data_id=step_ids(4)):
        model(torch.zeros(3, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    run.finalize()
    assert logix.open_store(run_dir).data_ids[-3:] == step_ids(4)


def test_resume_with_another_optimizer_or_interval_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir)
    model = make_model()
    run = logix.init(run_dir, resume=True)
    with pytest.raises(StoreError, match="recorded with 'sgd'"):
        run.watch(model, optimizer=torch.optim.Adam(model.parameters()))
    run.finalize()
    run = logix.init(run_dir, resume=True)
    with pytest.raises(StoreError, match="every 2 steps"):
        run.watch(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), trajectory_every=3)
    run.finalize()
    assert Trajectory(run_dir).n_steps == STEPS


@pytest.mark.parametrize("damaged", ["checkpoints/step-00000008.safetensors", "steps/steps-00000004.json"])
def test_a_damaged_checkpoint_or_step_file_moves_the_resume_back(tmp_path, damaged):
    """A half-written or damaged last file is not trusted: the trajectory continues from the
    last checkpoint before it, and the retrained steps give the clean run's store and replay."""
    clean_dir, run_dir = tmp_path / "clean", tmp_path / "run"
    train(clean_dir)
    train(run_dir)
    path = run_dir / "trajectory" / damaged
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    expected = 6 if damaged.startswith("checkpoints") else 4
    with pytest.warns(UserWarning, match=f"continues from step {expected}"):
        train(run_dir, resume=True)
    _check_equal_to_clean(run_dir, clean_dir)
