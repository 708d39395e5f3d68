"""Fixtures shared by several test files."""

import weakref

import pytest
import torch

from logix.store.writer import StoreWriter


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread (several threads spin for microsecond products on a
    shared machine). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- every run a test opens is closed by it ----------------------------------------------------
# A store writer left open is only reported at interpreter exit ("the store writer ... was never
# closed"), after the test summary and without the test's name. Tracking the writers here makes
# such a test fail at its own teardown, naming its run directories, so the suite stays clean.
_WRITERS: weakref.WeakSet = weakref.WeakSet()
_writer_init = StoreWriter.__init__


def _tracked_init(self, *args, **kwargs):
    _writer_init(self, *args, **kwargs)
    _WRITERS.add(self)


StoreWriter.__init__ = _tracked_init


def _open_writers(exclude=frozenset()) -> list:
    return [w for w in list(_WRITERS) if not w._closed and id(w) not in exclude]


@pytest.fixture(autouse=True)
def runs_are_closed():
    """Fail a test that leaves a store writer of its own open (finalize its runs, or use
    `with logix.init(...) as run:`); the writer is closed so that nothing leaks further."""
    before = {id(w) for w in _open_writers()}
    yield
    left = _open_writers(before)
    for w in left:
        try:
            w.close()
        except Exception:  # noqa: BLE001 - the test's own failure is the message
            pass
    if left:
        dirs = ", ".join(str(w.run_dir) for w in left)
        pytest.fail(f"the test left {len(left)} store writer(s) open ({dirs}): call run.finalize()")


def pytest_sessionfinish(session, exitstatus):
    """Writers opened outside any test (module fixtures) and never closed fail the session."""
    left = _open_writers()
    if left:
        dirs = ", ".join(str(w.run_dir) for w in left)
        print(f"\nstore writer(s) never closed: {dirs}: finalize the runs of these fixtures")
        session.exitstatus = 1
