"""Nothing is read from or written through a symbolic link inside a run directory (issue #19,
finding 4): a link to a directory or file elsewhere is refused with a StoreError naming it,
and nothing outside the run directory is read as the store's own or changed."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from guarantee_helpers import CONFIG, N_IDS, clean_run, data, log, model, rows_by_id

import logix
from logix import InfluenceEngine
from logix.errors import StoreError
from logix.store.trajectory import Trajectory

HALF = list(range(N_IDS // 2))

# Every kind of part of a run directory that logix opens, as a relative path.
PARTS = [
    "manifest.json",
    "projections.safetensors",
    "index",
    "index/rank-00000.json",
    "index/rank-00000.lock",
    "shards",
    "shards/0",
    "shards/0/r00000-000000.safetensors",
    "curvature",
    "curvature/0",
    "curvature/0/raw-r00000.safetensors",
    "curvature/0/kfac-r00000.safetensors",
]
READ_PARTS = [p for p in PARTS if not p.endswith(".lock")]  # readers take no lock


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    """A store holding the first half of the ids (raw and K-FAC statistics), logged once."""
    return clean_run(tmp_path_factory.mktemp("links") / "run", HALF)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _link_out(run_dir: Path, part: str, elsewhere: Path) -> Path:
    """Move `part` of the store to `elsewhere` and leave a symbolic link to it in its place."""
    target = elsewhere / part.replace("/", "--")
    elsewhere.mkdir(exist_ok=True)
    shutil.move(run_dir / part, target)
    (run_dir / part).symlink_to(target, target_is_directory=target.is_dir())
    return target


def _copy(logged: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(logged, run_dir, symlinks=True)
    return run_dir


def _queries(run_dir: Path):
    query = logix.init(run_dir, mode="query")
    m = model()
    query.watch(m)
    x, y = data([1000, 1001])
    with query(data_id=[1000, 1001]):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    return query.gradients()


def _resume_recipe(run_dir: Path) -> None:
    """The README's resume recipe, logging the second half; the run is closed however it ends."""
    run = logix.init(run_dir, resume=True)
    try:
        m = model()
        run.watch(m)
        done = run.logged_ids()
        log(run, m, [i for i in range(N_IDS) if i not in done])
    except BaseException:
        try:
            run.finalize()
        except StoreError:
            pass
        raise
    run.finalize()


@pytest.mark.parametrize("part", PARTS)
def test_a_resumed_writer_writes_nothing_through_a_link(logged, tmp_path, part):
    run_dir = _copy(logged, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    _link_out(run_dir, part, elsewhere)
    before = _files(elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StoreError, match="symbolic link") as caught:
            _resume_recipe(run_dir)
    assert str(run_dir / part) in str(caught.value)
    assert "cp -rL" in str(caught.value)  # the fix
    assert _files(elsewhere) == before


@pytest.mark.parametrize("part", READ_PARTS)
def test_a_query_reads_and_writes_nothing_through_a_link(logged, tmp_path, part):
    """Reading: open_store, query capture, and every preconditioner (whose caches would be
    written beside the statistics: finding 4 saw raw-stream and eigen-raw written elsewhere)."""
    run_dir = _copy(logged, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    _link_out(run_dir, part, elsewhere)
    before = _files(elsewhere)
    with pytest.raises(StoreError, match="symbolic link") as caught:
        store = logix.open_store(run_dir)
        q = _queries(run_dir)
        for kind in ("raw", "kfac", "ekfac"):
            InfluenceEngine(store, kind, 0.1).scores(q)
    assert str(run_dir / part) in str(caught.value)
    assert _files(elsewhere) == before


def test_full_verify_refuses_a_linked_curvature_directory(logged, tmp_path):
    run_dir = _copy(logged, tmp_path)
    _link_out(run_dir, "curvature/0", tmp_path / "elsewhere")
    store = logix.open_store(run_dir, verify="quick")  # rows do not need the curvature files
    assert len(store) == len(HALF)
    with pytest.raises(StoreError, match=r"curvature/0 is a symbolic link"):
        logix.open_store(run_dir, verify="full")


def test_a_linked_run_directory_itself_is_fine(logged, tmp_path):
    """The run directory (or a folder above it) may be a link: it is the user's choice of place."""
    real = _copy(logged, tmp_path)
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    _resume_recipe(alias)
    clean = rows_by_id(clean_run(tmp_path / "clean"))
    got = rows_by_id(alias)
    assert sorted(got) == sorted(clean)
    for i, row in clean.items():
        assert torch.equal(got[i], row)
    InfluenceEngine(logix.open_store(alias), "raw", 0.1).scores(_queries(alias))


def test_a_linked_trajectory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with logix.init(run_dir, config=CONFIG) as run:
        run.watch(m, optimizer=opt, trajectory_every=2)
        for start in range(0, 24, 6):
            batch = list(range(start, start + 6))
            x, y = data(batch)
            with run(data_id=batch):
                torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    Trajectory(run_dir)  # readable before
    elsewhere = tmp_path / "elsewhere"
    _link_out(run_dir, "trajectory", elsewhere)
    before = _files(elsewhere)
    with pytest.raises(StoreError, match=r"trajectory is a symbolic link"):
        Trajectory(run_dir)
    run = logix.init(run_dir, resume=True)
    with pytest.raises(StoreError, match=r"trajectory is a symbolic link"):  # was a raw OSError
        run.watch(m, optimizer=opt)
    run.finalize()
    assert _files(elsewhere) == before
