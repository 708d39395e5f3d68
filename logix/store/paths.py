"""Paths inside a run directory, checked before anything is opened through them.

Nothing is read from or written through a symbolic link inside a run directory: a link (to a
directory or to a file) can lead outside it, so a crafted or carelessly assembled store could
make logix write shards, caches or locks elsewhere, or read another store's files as its own.
Every path logix opens in a store is built by `inside(run_dir, ...)` (or, for a file of a
directory built that way, `checked_file`), which checks that it stays below the run directory
lexically and that no existing part of it below the run directory is a link. The run directory
itself may be a link, or lie under one: that is the user's choice of place.

The checks are `lstat` calls made just before a file is opened: they guard against prepared
directories, not against another process swapping parts of the store while logix runs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from logix.errors import StoreError


def _link_error(link: Path) -> StoreError:
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    return StoreError(
        f"{link} is a symbolic link (to {target}): logix reads and writes nothing through a link "
        "inside a store, since it can lead outside the run directory. Replace the link by the "
        "directory or file it points to (move the target into its place), or copy the store "
        "without links (`cp -rL SRC DST`) and use the copy"
    )


def inside(run_dir: str | Path, *parts: str | Path) -> Path:
    """`run_dir / parts` after checking it: the parts (relative, or an absolute path under
    `run_dir`) hold no '..', and no existing component below `run_dir` is a symbolic link or
    a file where a directory is needed. Missing components are fine (they are created as real
    directories). A StoreError naming the offending path and the fix otherwise."""
    root = Path(run_dir)
    rel = Path(*parts) if parts else Path()
    if rel.is_absolute():
        try:
            rel = rel.relative_to(root)
        except ValueError:
            raise StoreError(f"{rel} is outside the run directory {root}") from None
    if ".." in rel.parts:
        raise StoreError(f"{rel} leads outside the run directory {root} ('..'): the name is damaged")
    path = root
    for part in rel.parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            break
        except NotADirectoryError:
            check_run_dir_parent(path)  # names the file on the way
            raise StoreError(f"{path.parent} is not a directory: the store {root} is damaged") from None
        except OSError as e:
            raise StoreError(f"{path} cannot be examined ({e}): check the store's file system") from e
        if stat.S_ISLNK(mode):
            raise _link_error(path)
    return root / rel


def checked_file(path: str | Path) -> Path:
    """`path`, a file in a directory that `inside` built (e.g. `curvature_dir(...)`), after
    checking that the file itself is not a link."""
    path = Path(path)
    return inside(path.parent, path.name)


def glob_inside(run_dir: str | Path, directory: str, pattern: str) -> Iterator[Path]:
    """The paths `run_dir/directory/pattern` matches, each checked with `inside` (a link met on
    the way, e.g. a linked segment directory under shards/, is a StoreError, not followed)."""
    root = Path(run_dir)
    base = inside(root, directory)
    for path in sorted(base.glob(pattern)):
        yield inside(root, path.relative_to(root))


def check_run_dir_parent(run_dir: str | Path) -> None:
    """Refuse a run directory under a file (`logix.init("notes.txt/run")`): a StoreError, where
    the file system would raise NotADirectoryError somewhere later."""
    path = Path(run_dir)
    for parent in [path, *path.parents]:
        try:
            mode = os.stat(parent).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise StoreError(f"{parent} cannot be examined ({e}): check the path of the store") from e
        if parent != path and not stat.S_ISDIR(mode):
            raise StoreError(
                f"{parent} is a file, not a directory, so {path} cannot lie under it: choose a "
                "directory path for the store (or, inside a store, the store is damaged)"
            )
        return
