"""Progress bars: drawn on a terminal up to each pass's row count, never on a pipe or when quiet."""

from __future__ import annotations

import io
import re

import pytest
from query_helpers import build_store, mlp_modules, mlp_rows, queries
from rich.console import Console

from logix.progress import ProgressBars
from logix.query.engine import InfluenceEngine

N_TRAIN = 37


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("progress") / "run", mlp_modules(), mlp_rows(N_TRAIN, seed=3))


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=120), out


def test_bars_advance_to_the_row_count_of_every_pass(store_dir):
    console, out = terminal()
    bars = ProgressBars(console=console)
    # chunk_bytes of 8 rows: several chunks, so the bar moves through intermediate counts
    engine = InfluenceEngine(store_dir, "raw", 0.1, progress=bars, chunk_bytes=8 * 39 * 4)
    q = queries(mlp_rows(2, seed=4), mlp_modules())
    engine.top_k(q, k=3)
    engine.self_influence()
    engine.scores(q)
    text = out.getvalue()
    for label in ("top-k", "self-influence", "scoring"):
        assert label in text
    assert f"{N_TRAIN}/{N_TRAIN}" in text and "rows/s" in text
    assert bars._progress is None  # every display stopped after its method returned


def test_passes_report_chunk_by_chunk(store_dir):
    calls = []
    engine = InfluenceEngine(
        store_dir, "raw", 0.1, progress=lambda *c: calls.append(c), chunk_bytes=8 * 39 * 4
    )
    engine.top_k(queries(mlp_rows(2, seed=4), mlp_modules()), k=3)
    assert [c for c in calls if c[0] == "top_k"] == [("top_k", d, N_TRAIN) for d in (8, 16, 24, 32, 37)]


def test_engine_draws_bars_by_default_on_a_terminal(store_dir, monkeypatch):
    console, out = terminal()
    monkeypatch.setattr("rich.console.Console", lambda *a, **k: console)
    engine = InfluenceEngine(store_dir, "raw", 0.1)
    engine.self_influence()
    assert "self-influence" in out.getvalue()
    assert f"{N_TRAIN}/{N_TRAIN}" in out.getvalue()


def test_no_bars_when_quiet_or_not_a_terminal(store_dir, monkeypatch):
    console, out = terminal()
    monkeypatch.setattr("rich.console.Console", lambda *a, **k: console)
    InfluenceEngine(store_dir, "raw", 0.1, quiet=True).self_influence()
    assert out.getvalue() == ""
    piped = io.StringIO()
    bars = ProgressBars(console=Console(file=piped))  # a file, not a terminal
    InfluenceEngine(store_dir, "raw", 0.1, progress=bars).self_influence()
    assert piped.getvalue() == "" and not bars.enabled


def test_display_stopped_after_an_error_mid_pass(store_dir, monkeypatch):
    console, _ = terminal()
    bars = ProgressBars(console=console)
    engine = InfluenceEngine(store_dir, "raw", 0.1, progress=bars)

    def failing(*args):
        bars("top_k", 3, N_TRAIN)
        assert bars._progress is not None
        raise OSError("disk gone")

    monkeypatch.setattr(engine._local, "best", failing)
    with pytest.raises(OSError, match="disk gone"):
        engine.top_k(queries(mlp_rows(1, seed=5), mlp_modules()), k=2)
    assert bars._progress is None


@pytest.mark.parametrize("spelling", ["fit", "run"])
def test_a_statistics_pass_given_its_length_draws_a_bar(tmp_path, monkeypatch, spelling):
    import torch
    from kfac_helpers import SeqNet, log_model, make_batches, seq_loss

    import logix

    model = SeqNet()
    batches = make_batches(torch.Generator().manual_seed(0))
    log_model(tmp_path / "run", model, batches, statistics=("raw",))
    console, out = terminal()
    monkeypatch.setattr("rich.console.Console", lambda *a, **k: console)
    run = logix.init(tmp_path / "run", resume=True)
    run.watch(model)
    seen = []
    with run.fit_curvature(total=len(batches)) as fit:
        for ids, x, y, mask in batches:
            with fit(data_id=ids, mask=mask) if spelling == "fit" else run(data_id=ids, mask=mask):
                seq_loss(model(x), y, mask, "mean").backward()
            model.zero_grad()
            seen.append(fit.blocks if fit.progress._tasks else None)
    run.finalize()
    assert seen == [1, 2, None]  # the bar's task is gone once the last batch is done
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # colours and cursor moves
    assert "statistics pass" in text and "3/3 batches" in text
