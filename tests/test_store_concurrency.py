"""One writer per (run directory, rank); a resume that always works; an unfinalized run at exit
(issue #10: concurrent writers, kill between rename and index update, dangerous flags)."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from child_process import run_python
from guarantee_helpers import CONFIG, N_IDS, clean_run, log, model, resume_recipe, rows_by_id
from store_helpers import WIDTH, make_store, rows_for

import logix
from logix.errors import StoreError
from logix.store.writer import StoreWriter

HERE = Path(__file__).parent


def run_child(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python process with this checkout's import path (2 min at most)."""
    return run_python("-c", script, *args, timeout=120)


def _racer(run_dir: str, barrier, results, ids: list[int]) -> None:
    torch.set_num_threads(1)
    try:
        barrier.wait()
        with logix.init(run_dir, config=CONFIG) as run:
            m = model()
            run.watch(m)
            log(run, m, ids)
        results.put(("ok", os.getpid(), ""))
    except StoreError as e:
        results.put(("refused", os.getpid(), str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put(("crashed", os.getpid(), repr(e)))


@pytest.mark.slow
def test_two_writers_racing_on_a_fresh_directory(tmp_path):
    """Started at the same moment, exactly one creator proceeds, the other gets a clear error
    and changes nothing; the winner's rows are all there. Repeated to hit many interleavings."""
    ctx = multiprocessing.get_context("fork")
    ids = list(range(60))
    for attempt in range(12):
        run_dir = tmp_path / f"run{attempt}"
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_racer, args=(str(run_dir), barrier, results, ids)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes = sorted(results.get(timeout=5) for _ in procs)
        assert [o[0] for o in outcomes] == ["ok", "refused"], outcomes
        assert str(run_dir) in outcomes[1][2] and (
            "in use by" in outcomes[1][2] or "already holds" in outcomes[1][2]
        )
        assert sorted(rows_by_id(run_dir)) == ids


def test_second_writer_joining_a_live_run_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = logix.init(run_dir, config=CONFIG)
    m = model()
    first.watch(m)
    log(first, m, list(range(20)))  # some shards written, a partial one pending
    second = logix.init(run_dir, resume=True)
    with pytest.raises(StoreError, match=rf"in use by process {os.getpid()} on .*only one process"):
        second.watch(model())
    with pytest.raises(StoreError, match="in use by"):
        logix.init(run_dir, overwrite=True)  # removing a live store is refused too
    log(first, m, list(range(20, 40)))
    first.finalize()
    assert sorted(rows_by_id(run_dir)) == list(range(40))
    third = logix.init(run_dir, resume=True)  # the lock went with the first writer
    third.watch(model())
    assert third.logged_ids() == set(range(40))
    third.finalize()


def test_resume_with_overwrite_is_an_error(tmp_path):
    run_dir = clean_run(tmp_path / "run", list(range(12)))
    with pytest.raises(ValueError, match="resume=True and overwrite=True contradict"):
        logix.init(run_dir, resume=True, overwrite=True)
    assert sorted(rows_by_id(run_dir)) == list(range(12))


KILL_AFTER_RENAME = """
import os, signal, sys
import logix.store.writer as writer
from guarantee_helpers import N_IDS, clean_run
real, count = writer.write_shard, [0]
def write_then_die(*args, **kwargs):
    entry = real(*args, **kwargs)
    count[0] += 1
    if count[0] == int(sys.argv[2]):  # the shard is renamed into place; the index is not updated
        os.kill(os.getpid(), signal.SIGKILL)
    return entry
writer.write_shard = write_then_die
clean_run(sys.argv[1])
"""


@pytest.mark.slow
def test_kill_between_rename_and_index_update_then_readme_recipe(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_child(KILL_AFTER_RENAME, str(run_dir), "3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with pytest.warns(UserWarning, match=r"1 complete shard\(s\) \(8 rows\) are not in the index"):
        store = logix.open_store(run_dir)
    assert len(store) == 16 and store.missing_ids(range(24)) == []  # the 3rd shard is seen

    with pytest.warns(UserWarning, match="adopted"):
        resume_recipe(run_dir, list(range(N_IDS)))
    got = rows_by_id(run_dir)
    clean = rows_by_id(clean_run(tmp_path / "clean"))
    assert sorted(got) == list(range(N_IDS))
    for i in range(N_IDS):
        assert torch.equal(got[i], clean[i])


def test_duplicate_error_names_logged_ids(tmp_path):
    run_dir = make_store(tmp_path / "run")
    with StoreWriter(run_dir, width=WIDTH) as w:
        w.add([1, 2], rows_for([1, 2]))
        with pytest.raises(StoreError, match=r"run.logged_ids\(\)"):
            w.add([2], rows_for([2]))


UNFINALIZED = """
import sys
import logix
from guarantee_helpers import CONFIG, log, model
def work():
    run = logix.init(sys.argv[1], config=CONFIG)
    m = model()
    run.watch(m)
    log(run, m, list(range(30)))  # 3 full shards of 8 and 6 rows pending; never finalized
work()
import gc; gc.collect()  # the Run is garbage now
"""


@pytest.mark.slow
def test_unfinalized_run_flushes_at_exit_and_warns(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_child(UNFINALIZED, str(run_dir))
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "was never closed: run.finalize() was not called" in err
    # 6 rows were still buffered; the 3 full shards may or may not have reached the disk yet.
    pending = int(re.search(r"its (\d+) pending rows were written", err).group(1))
    assert 6 <= pending <= 30
    store = logix.open_store(run_dir, verify="full")
    assert sorted(store.data_ids) == list(range(30))
    assert store.rank_status() == {0: "not finalized"}


def test_over_long_ids_are_refused_at_the_batch(tmp_path):
    run = logix.init(tmp_path / "run", config=CONFIG)
    run.watch(model())
    with pytest.raises(StoreError, match="at most 1024"):
        run(data_id=["x" * 1025, "y"])
    with pytest.raises(StoreError, match="64 bits"):
        run(data_id=[2**70])
    run.finalize()


def test_shards_are_cut_before_their_ids_outgrow_the_header(tmp_path, monkeypatch):
    import logix.store.pending_shard as pending_shard

    monkeypatch.setattr(pending_shard, "MAX_SHARD_ID_BYTES", 50_000)
    run_dir = make_store(tmp_path / "run")
    ids = [f"{i:04d}" + "é" * 1000 for i in range(40)]  # ~6 KB of escaped JSON each
    with StoreWriter(run_dir, width=WIDTH, shard_rows=4096) as w:
        w.add(ids, torch.zeros(40, WIDTH))
    store = logix.open_store(run_dir, verify="full")
    assert store.data_ids == ids and len(store.shards) > 1
    assert max(sh["bytes"] for sh in store.shards) < 60_000


def test_leftover_temporary_files_are_kept_while_their_writer_lives(tmp_path):
    run_dir = make_store(tmp_path / "run")
    w = StoreWriter(run_dir, width=WIDTH, shard_rows=4)
    tmp = run_dir / "shards" / "0" / ".r00000-000005.safetensors.tmp-1-1"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"in flight")
    with pytest.raises(StoreError, match="in use by"):
        StoreWriter(run_dir, width=WIDTH)
    assert tmp.exists()  # the refused writer touched nothing
    w.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StoreWriter(run_dir, width=WIDTH).close()
    assert not tmp.exists()  # its owner is gone now


def test_run_directory_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        logix.open_store(path)
    with pytest.raises(StoreError, match="is a file, not a directory"):  # at init or at watch
        logix.init(path, config=CONFIG).watch(model())


CHILD_SCRIPT = textwrap.dedent("""
    import sys
    from logix.store.writer import StoreWriter
    from store_helpers import WIDTH
    StoreWriter(sys.argv[1], width=WIDTH).close()
""")


def test_second_process_is_told_the_holder(tmp_path):
    run_dir = make_store(tmp_path / "run")
    w = StoreWriter(run_dir, width=WIDTH)
    proc = run_child(CHILD_SCRIPT, str(run_dir))
    assert proc.returncode != 0
    assert f"in use by process {os.getpid()}" in proc.stderr.decode()
    w.close()
