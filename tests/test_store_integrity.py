"""Everything a query depends on is verified (issue #10): projections digest, checksums of every
curvature file kind, paths and names read from a store, full verification, read-only stores."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import warnings

import pytest
import torch
from guarantee_helpers import clean_run, data, model
from rich.console import Console
from store_helpers import WIDTH, make_store, rows_for

import logix
from logix.commands import inspect
from logix.errors import StoreError
from logix.query.engine import InfluenceEngine
from logix.store.format import index_path, read_json, write_json_atomic
from logix.store.writer import StoreWriter

N = 40
KINDS = ("raw", "kfac", "ekfac")


def _store(tmp_path, name="run"):
    return clean_run(tmp_path / name, list(range(N)))


def _queries(run_dir):
    query = logix.init(run_dir, mode="query")
    m = model()
    query.watch(m)
    x, y = data([1000, 1001, 1002])
    with query(data_id=[1000, 1001, 1002]):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    return query.gradients()


def _scores(run_dir, kind, q):
    return InfluenceEngine(logix.open_store(run_dir), kind, 0.1).scores(q).values


def _flip(path, from_end: int = 3):
    """Flip one bit in the data region of a file (a safetensors header still parses)."""
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x04
    path.write_bytes(bytes(data))


def _inspect(run_dir, *extra):
    parser = argparse.ArgumentParser()
    inspect.add_arguments(parser)
    console = Console(record=True, width=200, file=io.StringIO())
    code = inspect.main(parser.parse_args([str(run_dir), *extra]), console=console)
    return code, console.export_text()


def test_projections_bit_flip_is_found_everywhere(tmp_path):
    run_dir = _store(tmp_path)
    _flip(run_dir / "projections.safetensors")
    with pytest.raises(StoreError, match="does not match the store's manifest"):
        logix.open_store(run_dir)
    with pytest.raises(StoreError, match="does not match the store's manifest"):
        logix.init(run_dir, resume=True).watch(model())  # no rows logged with other projections
    with pytest.raises(StoreError, match="does not match the store's manifest"):
        logix.init(run_dir, mode="query").watch(model())
    code, text = _inspect(run_dir, "--full")
    assert code == 2 and "projections" in text and "FAILED" in text
    assert len(logix.open_store(run_dir, verify="none")) == N  # the rows stay readable


@pytest.mark.parametrize("name, kind", [("raw-r00000", "raw"), ("kfac-r00000", "kfac")])
def test_statistics_bit_flip_is_an_error(tmp_path, name, kind):
    run_dir = _store(tmp_path)
    q = _queries(run_dir)
    _flip(run_dir / "curvature" / "0" / f"{name}.safetensors")
    with pytest.raises(StoreError, match="does not match the checksum"):
        _scores(run_dir, kind, q)
    with pytest.raises(StoreError, match="does not match its checksum"):
        logix.open_store(run_dir, verify="full")
    code, text = _inspect(run_dir, "--full")
    assert code == 2 and f"{name}.safetensors does not match its checksum" in text


@pytest.mark.parametrize(
    "cache, kind",
    [
        ("raw-stream", "raw"),
        ("eigen-raw", "raw"),
        ("eigen-kfac", "kfac"),
        ("eigen-kfac", "ekfac"),
        ("ekfac-stream", "ekfac"),
    ],
)
def test_cache_bit_flip_is_recomputed(tmp_path, cache, kind):
    run_dir = _store(tmp_path)
    q = _queries(run_dir)
    curvature = run_dir / "curvature" / "0"
    if cache == "raw-stream":
        (curvature / "raw-r00000.safetensors").unlink()  # statistics then come from a recompute
    clean = _scores(run_dir, kind, q)
    path = curvature / f"{cache}.safetensors"
    assert path.exists()
    for offset in (3, 200):  # two places in the data region
        _flip(path, offset)
        damaged = path.read_bytes()
        assert torch.equal(_scores(run_dir, kind, q), clean)
        assert path.read_bytes() != damaged  # replaced by the recompute


def _index(run_dir):
    return read_json(index_path(run_dir, 0))


def test_shard_paths_outside_the_run_directory_are_refused(tmp_path):
    run_dir = _store(tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(run_dir / "shards" / "0" / "r00000-000000.safetensors", outside)
    for file in ("../outside.safetensors", str(outside), "shards/0/../../../outside.safetensors"):
        index = _index(run_dir)
        good = index["shards"][0]["file"]
        index["shards"][0]["file"] = file
        write_json_atomic(index_path(run_dir, 0), index)
        for verify in ("none", "quick"):
            with pytest.raises(StoreError, match="Nothing outside the run directory is read"):
                logix.open_store(run_dir, verify=verify)
        index["shards"][0]["file"] = good
        write_json_atomic(index_path(run_dir, 0), index)


def test_segment_names_escaping_the_run_directory_are_refused(tmp_path):
    run_dir = make_store(tmp_path / "run")
    with StoreWriter(run_dir, width=WIDTH) as w:
        w.add([0], rows_for([0]))
    index = _index(run_dir)
    index["segments"].append({"name": "../../x", "meta": {}})
    write_json_atomic(index_path(run_dir, 0), index)
    with pytest.raises(StoreError, match="not a valid segment name"):
        logix.open_store(run_dir)
    with pytest.raises(StoreError, match="not a valid segment name"):
        StoreWriter(run_dir, width=WIDTH)
    assert not (tmp_path / "x").exists() and not (run_dir.parent.parent / "x").exists()


def _two_shards(tmp_path):
    run_dir = make_store(tmp_path / "run")
    with StoreWriter(run_dir, width=WIDTH, shard_rows=3) as w:
        w.add(range(6), rows_for(range(6)))
    return run_dir


def test_full_verify_finds_a_shard_copied_under_another_number(tmp_path):
    run_dir = _two_shards(tmp_path)
    index = _index(run_dir)
    shards = run_dir / "shards" / "0"
    shutil.copy(shards / "r00000-000001.safetensors", shards / "r00000-000002.safetensors")
    index["shards"].append({**index["shards"][1], "seq": 2, "file": "shards/0/r00000-000002.safetensors"})
    index["next_seq"] = 3  # consistent with the listed shards (else that is refused first)
    write_json_atomic(index_path(run_dir, 0), index)
    with pytest.raises(StoreError, match="logged more than once.*changed outside logix"):
        logix.open_store(run_dir, verify="full")
    code, text = _inspect(run_dir, "--full")
    assert code == 2 and "more than once" in text


def test_a_shard_listed_twice_is_refused(tmp_path):
    run_dir = _two_shards(tmp_path)
    index = _index(run_dir)
    index["shards"].append(dict(index["shards"][1]))
    write_json_atomic(index_path(run_dir, 0), index)
    with pytest.raises(StoreError, match="twice"):
        logix.open_store(run_dir, verify="none")


def test_full_verify_checks_headers_against_index_and_manifest(tmp_path):
    run_dir = _two_shards(tmp_path)
    index = _index(run_dir)
    index["shards"][1]["rows"] = 2  # row count disagrees with the header (size and crc agree)
    write_json_atomic(index_path(run_dir, 0), index)
    with pytest.raises(StoreError, match="holds 3 rows and 3 ids, the index records 2"):
        logix.open_store(run_dir, verify="full")
    assert _inspect(run_dir, "--full")[0] == 2

    run_dir = _two_shards(tmp_path / "b")
    manifest = read_json(run_dir / "manifest.json")
    manifest["dtype"] = "bfloat16"  # the shards hold float32
    write_json_atomic(run_dir / "manifest.json", manifest)
    with pytest.raises(StoreError, match="holds F32 rows.*manifest says BF16"):
        logix.open_store(run_dir, verify="full")
    code, text = _inspect(run_dir, "--full")
    assert code == 2 and "BF16" in text


def test_deleted_index_is_reported(tmp_path):
    run_dir = _two_shards(tmp_path)
    index_path(run_dir, 0).unlink()
    with pytest.warns(UserWarning, match="not in the index"):
        logix.open_store(run_dir)
    code, text = _inspect(run_dir)
    assert "only in shards that no index lists" in text
    with pytest.warns(UserWarning, match="adopted"):
        StoreWriter(run_dir, width=WIDTH).close()
    assert logix.open_store(run_dir, verify="full").data_ids == list(range(6))


def test_manifest_damage_gives_clear_errors(tmp_path):
    run_dir = _two_shards(tmp_path)
    manifest = read_json(run_dir / "manifest.json")
    write_json_atomic(run_dir / "manifest.json", {k: v for k, v in manifest.items() if k != "modules"})
    with pytest.raises(StoreError, match="no module table"):
        logix.open_store(run_dir)
    shifted = [dict(m) for m in manifest["modules"]]
    shifted[1]["offset"] += 1
    write_json_atomic(run_dir / "manifest.json", {**manifest, "modules": shifted})
    with pytest.raises(StoreError, match="starts at column 7, expected 6"):
        logix.open_store(run_dir)
    write_json_atomic(run_dir / "manifest.json", {**manifest, "version": 99})
    with pytest.raises(StoreError, match=rf"logix {logix.__version__} reads up to version 1"):
        logix.open_store(run_dir)


def _read_only(path):
    """Make `path` read-only for real: chmod for users, a read-only bind mount for root."""
    if os.geteuid() != 0:
        for p in [path, *path.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return lambda: [p.chmod(p.stat().st_mode | 0o200) for p in [path, *path.rglob("*")]]
    ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if (
        not ok
        or subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode != 0
    ):
        if ok:
            subprocess.run(["umount", str(path)])
        pytest.skip("cannot make a read-only directory here (root without mount rights)")
    return lambda: subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("user_cache", [False, True])
def test_read_only_store_is_queryable_with_every_preconditioner(tmp_path, monkeypatch, user_cache):
    writable = _store(tmp_path, "writable")
    run_dir = _store(tmp_path, "readonly")
    (run_dir / "curvature" / "0" / "raw-r00000.safetensors").unlink()  # forces a recompute too
    q = _queries(writable)
    expected = {}
    for kind in KINDS:
        expected[kind] = _scores(writable, kind, q)
    if user_cache:
        monkeypatch.setenv("LOGIX_CACHE_DIR", str(tmp_path / "cache"))
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    undo = _read_only(run_dir)
    try:
        with pytest.raises(OSError):
            (run_dir / "probe").write_text("x")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for kind in KINDS:
                for _ in range(2):  # the second time from the kept cache
                    got = _scores(run_dir, kind, q)
                    assert torch.allclose(got, expected[kind], rtol=1e-5, atol=1e-6), kind
        notices = [str(w.message) for w in caught if "is not writable" in str(w.message)]
        assert len(notices) == 1, notices
        assert "LOGIX_CACHE_DIR" in notices[0]
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    finally:
        undo()
    if user_cache:
        assert list((tmp_path / "cache").rglob("eigen-raw.safetensors"))


def test_overwrite_removes_the_old_trajectory_and_index(tmp_path):
    """`init(overwrite=True)` replaces the whole store: a recorded trajectory and an approximate
    index of the old rows must not outlive it (a later replay or top-k would use them); files of
    the user's in the directory stay."""
    from guarantee_helpers import CONFIG

    run_dir = clean_run(tmp_path / "run")
    for part in ("trajectory", "ann"):
        (run_dir / part).mkdir()
        (run_dir / part / "old.json").write_text("{}")
    (run_dir / "notes.txt").write_text("mine")
    with logix.init(run_dir, config=CONFIG, overwrite=True) as run:
        run.watch(model())
    assert not (run_dir / "trajectory").exists() and not (run_dir / "ann").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"
