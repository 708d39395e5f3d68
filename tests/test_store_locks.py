"""Locks are released on every failure path (issue #19, "next in line"): a finalize() that
fails, a watch() that fails after the writer opened, or a run abandoned without finalize never
blocks a later run of the same process ("in use by process <its own pid>")."""

from __future__ import annotations

import errno
import warnings

import pytest
import torch
from guarantee_helpers import CONFIG, N_IDS, clean_run, data, log, model, resume_recipe, rows_by_id

import logix
from logix.capture.trajectory import TrajectoryRecorder
from logix.errors import ConfigError, StoreError
from logix.store import writer as writer_module

HALF = list(range(N_IDS // 2))


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    """id -> row of a clean run of every id (the reference of each test)."""
    return rows_by_id(clean_run(tmp_path_factory.mktemp("locks") / "clean"))


def _same_rows_as_a_clean_run(run_dir, clean: dict) -> None:
    got = rows_by_id(run_dir)
    assert sorted(got) == sorted(clean)
    for i, row in clean.items():
        assert torch.equal(got[i], row), i


def test_disk_full_while_logging_then_resume_in_the_same_process(tmp_path, monkeypatch, clean):
    """The shard writes fail (disk full) partway; finalize() raises; the same process resumes
    with the README recipe and ends with every id once."""
    run_dir = tmp_path / "run"
    run = logix.init(run_dir, config=CONFIG)
    m = model()
    run.watch(m)
    log(run, m, HALF[:60])
    run.flush()
    monkeypatch.setattr(writer_module, "write_shard", _disk_full)
    with pytest.raises(StoreError, match="No space left on device"):
        log(run, m, HALF[60:])
        run.finalize()
    with pytest.raises(StoreError, match="No space left on device"):
        run.finalize()  # again: the error is still raised, not swallowed
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resume_recipe(run_dir, list(range(N_IDS)))  # was: "in use by process <this pid>"
    _same_rows_as_a_clean_run(run_dir, clean)


def test_finalize_failing_in_the_trajectory_releases_the_lock(tmp_path, monkeypatch, clean):
    run_dir = tmp_path / "run"
    run = logix.init(run_dir, config=CONFIG)
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the rows stay those of a clean run
    run.watch(m, optimizer=opt, trajectory_every=10)
    for start in range(0, len(HALF), 6):
        batch = HALF[start : start + 6]
        x, y = data(batch)
        with run(data_id=batch):
            torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()
    monkeypatch.setattr(TrajectoryRecorder, "close", _disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        run.finalize()
    monkeypatch.undo()
    resume_recipe(run_dir, list(range(N_IDS)))
    _same_rows_as_a_clean_run(run_dir, clean)


def test_a_failed_watch_leaves_no_lock(tmp_path, clean):
    """watch() opens the writer, then refuses the optimizer: the lock goes with the failure."""
    run_dir = tmp_path / "run"
    run = logix.init(run_dir, config=CONFIG)
    m = model()
    with pytest.raises(ConfigError, match="RMSprop"):
        run.watch(m, optimizer=torch.optim.RMSprop(m.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "writer never closed" either
        resume_recipe(run_dir, list(range(N_IDS)))
    _same_rows_as_a_clean_run(run_dir, clean)
    run.finalize()  # the failed run ends without a word


def test_an_abandoned_run_does_not_block_the_next_one(tmp_path, clean):
    """A first run whose loop raised and that never finalized (a notebook cell that failed):
    a second run of the same process on the same directory takes over, after writing the rows
    the first one accepted, and says so."""
    run_dir = tmp_path / "run"
    first = logix.init(run_dir, config=CONFIG)
    m = model()
    first.watch(m)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        for start in range(0, len(HALF), 6):
            batch = HALF[start : start + 6]
            x, y = data(batch)
            with first(data_id=batch):
                torch.nn.functional.cross_entropy(m(x), y).backward()
                if batch[-1] >= 100:
                    raise RuntimeError("a bug in the loop")
            m.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"an earlier writer of .* in this process was never closed"):
        resume_recipe(run_dir, list(range(N_IDS)))
    _same_rows_as_a_clean_run(run_dir, clean)
    with pytest.raises(StoreError, match="taken over"):  # the abandoned run writes nothing more
        log(first, m, [N_IDS + 1])
    with pytest.raises(StoreError, match="taken over"):
        first.finalize()
    _same_rows_as_a_clean_run(run_dir, clean)
