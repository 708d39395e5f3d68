"""Statistics a log-mode run accumulates while logging, after a kill and the README resume
(issue #19, finding 2): the K-FAC factors say which rows they cover; factors that no longer
cover exactly the store's rows are refused at query time naming the fix (a statistics pass),
and after it the scores equal a clean run's. Raw statistics stay exact (recomputed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from child_process import run_python
from guarantee_helpers import clean_run, data, log, model, resume_recipe

import logix
from logix.errors import StoreError
from logix.query.engine import InfluenceEngine

N = 120

KILLED = """
import os, sys
import logix
from guarantee_helpers import CONFIG, log, model
run = logix.init(sys.argv[1], config=CONFIG)
m = model()
run.watch(m)
log(run, m, list(range(60)))
run.flush()                      # the factor file now covers ids 0..59
log(run, m, list(range(60, 102)))
run.writer.flush()               # rows 60..101 on disk, their factors only in memory
os._exit(9)                      # killed
"""


def _queries(run_dir):
    query = logix.init(run_dir, mode="query")
    m = model()
    query.watch(m)
    x, y = data([900, 901, 902])
    with query(data_id=[900, 901, 902]):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    return query.gradients()


def _scores(run_dir, kind, q):
    return InfluenceEngine(logix.open_store(run_dir), kind, 0.1).scores(q).values


def _close(got, expected):
    """Equal up to float32 summation order (relative to the largest score)."""
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.slow
def test_factors_of_a_resumed_kill_are_refused_until_recomputed(tmp_path):
    clean = clean_run(tmp_path / "clean", list(range(N)))
    q = _queries(clean)
    run_dir = tmp_path / "run"
    proc = run_python("-c", KILLED, str(run_dir))
    assert proc.returncode == 9, proc.stderr.decode()
    assert len(logix.open_store(run_dir)) == 102
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resume_recipe(run_dir, list(range(N)))
    notices = [str(w.message) for w in caught if "K-FAC factors" in str(w.message)]
    assert notices and "fit_curvature" in notices[-1], [str(w.message) for w in caught]
    assert len(logix.open_store(run_dir)) == N
    for kind in ("kfac", "ekfac"):
        with pytest.raises(StoreError, match=r"cover 78 of the 120 rows.*fit_curvature"):
            _scores(run_dir, kind, q)
    _close(_scores(run_dir, "raw", q), _scores(clean, "raw", q))

    with logix.init(run_dir, resume=True) as run:  # the fix the error names
        m = model()
        with pytest.warns(UserWarning, match="cover 78 of its 120 stored rows"):
            run.watch(m)
        with run.fit_curvature():
            log(run, m, list(range(N)))
    for kind in ("kfac", "ekfac"):
        _close(_scores(run_dir, kind, q), _scores(clean, kind, q))


def test_factors_of_a_clean_resume_cover_the_store(tmp_path):
    """Logging resumed after a clean finish continues the factor sums: no refusal, exact."""
    clean = clean_run(tmp_path / "clean", list(range(N)))
    q = _queries(clean)
    run_dir = clean_run(tmp_path / "run", list(range(60)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resume_recipe(run_dir, list(range(N)))
        for kind in ("kfac", "ekfac"):
            _close(_scores(run_dir, kind, q), _scores(clean, kind, q))
