"""Shard checksums: which 32-bit checksum a shard's index entry records, and computing it.

A shard entry's `crc32` field holds 8 hex digits; its optional `checksum` field names the
algorithm that produced them: absent (every store written before it existed) means zlib's
CRC-32, `"crc32c"` the Castagnoli CRC-32C, which the optional `crc32c` package computes in
hardware several times faster (`pip install 'logix[fast]'`). New shards use CRC-32C when that
package is installed, zlib's CRC-32 otherwise, so a store verifies by what each shard recorded.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

from logix.errors import StoreError

CHECKSUMS = ("crc32", "crc32c")
Update = Callable[[bytes | memoryview, int], int]


def _crc32c() -> Update | None:
    try:
        import crc32c  # noqa: PLC0415 - optional extra
    except ImportError:
        return None
    return crc32c.crc32c


def writing_checksum() -> str:
    """The algorithm new shards are checksummed with: "crc32c" when the package is there."""
    return "crc32c" if _crc32c() is not None else "crc32"


def checksum_update(algorithm: str) -> Update:
    """`update(data, value) -> value` of `algorithm` (start from 0); a clear error when it is
    CRC-32C and the `crc32c` package is missing."""
    if algorithm == "crc32":
        return zlib.crc32
    if algorithm == "crc32c":
        fn = _crc32c()
        if fn is None:
            raise StoreError(
                "this store's shards are checksummed with CRC-32C, which needs the crc32c "
                "package to verify: pip install 'logix[fast]' (or crc32c), or open the store "
                "with verify='quick' (sizes only)"
            )
        return fn
    raise StoreError(f"unknown shard checksum {algorithm!r} (one of {CHECKSUMS} expected)")


def entry_checksum(entry: dict) -> str:
    """The algorithm of a shard index entry's `crc32` digits (absent `checksum`: zlib CRC-32)."""
    return entry.get("checksum", "crc32")


def hex32(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


def file_checksum(path: Path, algorithm: str, buf: bytearray | None = None) -> str:
    """`algorithm`'s checksum of a file's bytes as 8 hex digits, read in blocks (into `buf`)."""
    update = checksum_update(algorithm)
    buf = buf if buf is not None else bytearray(1 << 22)
    view = memoryview(buf)
    value = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            value = update(view[:n], value)
    return hex32(value)
