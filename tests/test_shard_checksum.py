"""Shard checksums: stores written before the `checksum` field (zlib CRC-32, no field) still
verify, new shards record CRC-32C when the `crc32c` package is installed and verify with it,
and a store mixing both verifies shard by shard. Each checksum is compared with one computed
independently from the file's bytes."""

from __future__ import annotations

import zlib

import pytest
from store_helpers import make_store, rows_for

import logix.store.checksum as checksum
from logix.errors import StoreError
from logix.store.format import index_path, read_json, shard_file, write_json_atomic
from logix.store.reader import open_store
from logix.store.writer import StoreWriter


def _write(run_dir, ids) -> None:
    with StoreWriter(run_dir, width=8, shard_rows=4) as w:
        w.add(ids, rows_for(ids))


def _shards(run_dir) -> list[dict]:
    return read_json(index_path(run_dir, 0))["shards"]


def _flip_a_byte(run_dir, entry) -> None:
    path = shard_file(run_dir, entry["file"])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))


def _without_crc32c(monkeypatch) -> None:
    monkeypatch.setattr(checksum, "_crc32c", lambda: None)


def test_a_store_of_todays_format_verifies(tmp_path, monkeypatch):
    """Without the package the writer writes exactly today's entries: zlib CRC-32, no field."""
    _without_crc32c(monkeypatch)
    run_dir = make_store(tmp_path / "run")
    _write(run_dir, list(range(8)))
    for sh in _shards(run_dir):
        assert "checksum" not in sh
        assert sh["crc32"] == f"{zlib.crc32(shard_file(run_dir, sh['file']).read_bytes()):08x}"
    monkeypatch.undo()  # read with whatever this machine has: the entry says zlib CRC-32
    assert open_store(run_dir, verify="full").data_ids == list(range(8))
    _flip_a_byte(run_dir, _shards(run_dir)[1])
    with pytest.raises(StoreError, match=r"r00000-000001.safetensors is corrupted: crc32 "):
        open_store(run_dir, verify="full")


def test_crc32c_shards_record_and_verify_their_algorithm(tmp_path):
    crc32c = pytest.importorskip("crc32c")
    run_dir = make_store(tmp_path / "run")
    _write(run_dir, list(range(8)))
    for sh in _shards(run_dir):
        assert sh["checksum"] == "crc32c"
        data = shard_file(run_dir, sh["file"]).read_bytes()
        assert sh["crc32"] == f"{crc32c.crc32c(data):08x}" != f"{zlib.crc32(data):08x}"
    assert open_store(run_dir, verify="full").data_ids == list(range(8))
    _flip_a_byte(run_dir, _shards(run_dir)[0])
    with pytest.raises(StoreError, match=r"r00000-000000.safetensors is corrupted: crc32c "):
        open_store(run_dir, verify="full")


def test_a_store_mixing_both_verifies_shard_by_shard(tmp_path, monkeypatch):
    pytest.importorskip("crc32c")
    run_dir = make_store(tmp_path / "run")
    with monkeypatch.context() as m:
        _without_crc32c(m)
        _write(run_dir, list(range(4)))  # an older store ...
    _write(run_dir, list(range(4, 8)))  # ... appended to with the package installed
    assert [sh.get("checksum") for sh in _shards(run_dir)] == [None, "crc32c"]
    assert open_store(run_dir, verify="full").data_ids == list(range(8))


def test_crc32c_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("crc32c")
    run_dir = make_store(tmp_path / "run")
    _write(run_dir, list(range(4)))
    _without_crc32c(monkeypatch)
    with pytest.raises(StoreError, match=r"CRC-32C.*logix\[fast\]"):
        open_store(run_dir, verify="full")
    assert open_store(run_dir, verify="quick").data_ids == list(range(4))  # sizes need no package


def test_an_unknown_checksum_name_is_a_damaged_index(tmp_path):
    run_dir = make_store(tmp_path / "run")
    _write(run_dir, list(range(4)))
    index = read_json(index_path(run_dir, 0))
    index["shards"][0]["checksum"] = "md5"
    write_json_atomic(index_path(run_dir, 0), index)
    with pytest.raises(StoreError, match=r"checksum 'md5'.*index is damaged"):
        open_store(run_dir, verify="quick")
