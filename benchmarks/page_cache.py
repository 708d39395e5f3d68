"""Cold-read helpers shared by the read benchmarks: evict files from the page cache, and the plain
sequential read (what `dd bs=8M` does) that the store's reader is measured against."""

from __future__ import annotations

import os
from pathlib import Path


def evict_files(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (fsynced first, so the pages are clean and
    droppable); needs no root and touches no other file."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(files: list[Path], block: int = 8 << 20) -> int:
    """Read every file front to back with `block`-byte readinto calls; returns the bytes read."""
    view = memoryview(bytearray(block))
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total
