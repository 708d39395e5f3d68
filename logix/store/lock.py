"""One writer per (run directory, rank), and one creator per run directory: OS file locks.

A writer holds `fcntl.flock` on `index/rank-NNNNN.lock` for its lifetime; the lock file records
who holds it (pid, host, start time) so that a second writer is told which process is in the
way. The kernel drops the lock when its holder dies, even by SIGKILL: a lock file left behind
never blocks anyone. Readers never take a lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from logix.errors import StoreError
from logix.store.format import INDEX_DIR
from logix.store.paths import glob_inside, inside

CREATE_LOCK = "create.lock"
# Locks held in this process: their file (resolved) -> whether their holder gives them up. A
# lock held by an earlier writer of this same process whose run failed (its loop raised, its
# disk filled) and was never finalized is handed over instead of refused with this process's pid.
_GIVE_WAY: dict[str, Callable[[], bool]] = {}


def lock_path(run_dir: Path, rank: int) -> Path:
    return inside(run_dir, INDEX_DIR, f"rank-{rank:05d}.lock")


def _holder(fd: int) -> str:
    """Who holds the lock whose file is open as `fd`, as recorded in it ("" if unknown)."""
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode()) if raw else {}
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


class FileLock:
    """An exclusive flock on `path`, held until `release()` (or the process ends).

    `give_way`: asked when a later locker of this same process wants the lock; it returns True
    after giving the lock up (`release()`), False to keep it (the later locker is refused)."""

    def __init__(
        self, path: Path, *, wait: bool = False, what: str = "", give_way: Callable[[], bool] | None = None
    ) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise not_writable(self.path.parent.parent, e) from e
        self._key = os.path.realpath(self.path)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                if not self._earlier_gives_way():
                    raise
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self._fd)
            os.close(self._fd)
            self._fd = None
            ours = (
                " That is this process: an earlier run of this directory is still open; call its "
                "run.finalize() first."
                if holder.startswith(f"process {os.getpid()} on {socket.gethostname()} ")
                else ""
            )
            raise StoreError(
                f"{what or self.path} is in use by {holder or 'another process'}: only one "
                "process may write it at a time. Wait for that process to finish (or stop it), "
                f"or log into another run directory.{ours}"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)
        if give_way is not None:
            _GIVE_WAY[self._key] = give_way

    def _earlier_gives_way(self) -> bool:
        """Whether a holder of this lock in this process gave it up (a failed one writes what
        it has and lets go)."""
        earlier = _GIVE_WAY.get(self._key)
        if earlier is None:
            return False
        try:
            return earlier()
        except BaseException:
            os.close(self._fd)  # type: ignore[arg-type]
            self._fd = None
            raise

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with the next locker)."""
        if self._fd is not None:
            _GIVE_WAY.pop(self._key, None)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


def not_writable(run_dir: Path, error: OSError) -> StoreError:
    """The error of a writer that cannot write the store (read-only media, permissions)."""
    return StoreError(
        f"the store {run_dir} cannot be written here ({error}): logging into it or resuming it "
        "needs write access (a read-only mount, another user's files?). A read-only store can "
        "still be read and queried (logix.open_store, logix.init(path, mode='query'))"
    )


def writer_lock(run_dir: Path, rank: int, give_way: Callable[[], bool] | None = None) -> FileLock:
    """The lock of rank `rank`'s writer of `run_dir`; a StoreError naming the holder if taken
    (by another process, or by a writer of this one without `give_way`)."""
    return FileLock(lock_path(run_dir, rank), what=f"rank {rank} of the store {run_dir}", give_way=give_way)


def creation_lock(run_dir: Path) -> FileLock:
    """Serialises store creation and removal in `run_dir` (waits for another creator)."""
    return FileLock(inside(run_dir, INDEX_DIR, CREATE_LOCK), wait=True)


def lock_all_writers(run_dir: Path) -> list[FileLock]:
    """Every existing rank's writer lock of `run_dir` (to remove the store safely); a StoreError
    naming the holder when a writer is live (the locks taken so far are released)."""
    held: list[FileLock] = []
    try:
        for p in glob_inside(run_dir, INDEX_DIR, "rank-*.lock"):
            number = p.stem.split("-", 1)[1]
            if number.isdigit():
                held.append(writer_lock(run_dir, int(number)))
    except StoreError:
        for lock in held:
            lock.release()
        raise
    return held
