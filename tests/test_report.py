"""The HTML report: its content (order, scale, legend, escaping), its renderers (PNG bytes,
token highlights) and the page in a real headless browser (no console errors; the examples'
pixels on screen, square and unsmoothed)."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
import torch
from browser_helpers import colour_count, load
from query_helpers import build_store, mlp_modules, mlp_rows, queries

from logix.query import render
from logix.query.engine import InfluenceEngine
from logix.query.results import Scores

MAGENTA, CYAN = (255, 0, 255), (0, 255, 255)


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    ids = [f"ex<{i}>" for i in range(30)]  # markup in ids must come out escaped
    run_dir = build_store(tmp_path_factory.mktemp("report") / "run", mlp_modules(), mlp_rows(30, seed=1), ids)
    return InfluenceEngine(run_dir, "raw", 0.1).scores(
        queries(mlp_rows(2, seed=2), mlp_modules()), mode="relative"
    )


def cards(page: str, kind: str) -> list[tuple[str, float, float]]:
    """(id, scaled, raw) of every card of `kind` in page order."""
    pattern = (
        rf'<div class="card {kind}">.*?<div class="id">id (.*?) · row \d+</div>.*?'
        r'class="score">([+-][0-9.]+)</span> <span class="raw">raw ([^<]+)</span>'
    )
    return [(html.unescape(i), float(s), float(r)) for i, s, r in re.findall(pattern, page)]


def test_report_lists_helpful_and_harmful_in_order_on_one_scale(scores, tmp_path):
    page = scores.report(tmp_path / "r.html", k=3).read_text()
    helpful, harmful = cards(page, "helpful"), cards(page, "harmful")
    assert len(helpful) == len(harmful) == 6
    total = scores.values
    for q in range(2):
        row = total[q]
        best = torch.sort(row, descending=True, stable=True).indices[:3].tolist()
        worst = torch.sort(-row, descending=True, stable=True).indices[:3].tolist()
        assert [c[0] for c in helpful[3 * q : 3 * q + 3]] == [scores.train_ids[j] for j in best]
        assert [c[0] for c in harmful[3 * q : 3 * q + 3]] == [scores.train_ids[j] for j in worst]
        peak = max(row.max().item(), -row.min().item())
        for (_, scaled, raw), j in zip(helpful[3 * q : 3 * q + 3] + harmful[3 * q : 3 * q + 3], best + worst):
            assert raw == pytest.approx(row[j].item(), rel=1e-3)
            assert scaled == pytest.approx(row[j].item() / peak, abs=0.006)
        assert max(abs(c[1]) for c in helpful[3 * q : 3 * q + 3] + harmful[3 * q : 3 * q + 3]) == 1.0
    assert "ex<" not in page and "ex&lt;" in page
    assert "up-weighting this training example would lower the query's loss" in page
    assert "mode <i>relative</i>" in page and "largest |score|" in page


def test_top_k_report_without_harmful_says_so(scores, tmp_path):
    page = scores.top_k(2).report(tmp_path / "t.html").read_text()
    assert len(cards(page, "helpful")) == 4 and not cards(page, "harmful")
    assert "also shows the most harmful" in page
    with pytest.raises(ValueError, match=r"\*\.html"):
        scores.report(tmp_path / "r.png")


def test_renderer_results(scores, tmp_path):
    page = scores.report(tmp_path / "a.html", k=1, render=lambda i: f"<b>{i}</b>").read_text()
    assert "&lt;b&gt;ex&lt;" in page  # a str is text, escaped
    with pytest.raises(TypeError, match="logix.render.Html"):
        scores.report(tmp_path / "b.html", k=1, render=lambda i: 3)


def test_png_bytes_decode_to_the_pixels():
    image = pytest.importorskip("PIL.Image")
    import io

    rng = np.random.default_rng(0)
    for shape in ((8, 8), (5, 7, 3)):
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        back = np.asarray(image.open(io.BytesIO(render.png(pixels))))
        np.testing.assert_array_equal(back, pixels)
    tag = render.image(np.linspace(0, 1, 64).reshape(8, 8), size=96)
    assert 'width="96" height="96"' in tag and tag.startswith("<img") and "data:image/png;base64," in tag
    assert 'width="96" height="48"' in render.image(np.zeros((4, 8)), size=96)


def test_token_highlights_follow_their_scores():
    out = render.tokens(["the", "<cat>", "sat"], [0.5, -1.0, 0.0])
    alphas = [float(a) for a in re.findall(r"rgba\([0-9,]+,([0-9.]+)\)", out)]
    assert alphas == [0.5, 1.0, 0.0]
    assert "rgba(22,163,74,0.500)" in out and "rgba(220,38,38,1.000)" in out and "&lt;cat&gt;" in out
    assert 'title="-1"' in out
    with pytest.raises(ValueError, match="3 tokens but 2"):
        render.tokens(["a", "b", "c"], [1, 2])


def checkerboard() -> np.ndarray:
    board = np.zeros((8, 8, 3), np.uint8)
    board[:] = CYAN
    board[(np.add.outer(np.arange(8), np.arange(8)) % 2) == 0] = MAGENTA
    return board


def test_report_in_a_real_browser(tmp_path):
    values = torch.tensor([[497.0, 12.0, -3.0, -40.0], [0.008, 0.004, -0.001, -0.002]])
    s = Scores(values, ["q-a", "q-b"], [10, 11, 12, 13], "relative", None, {"preconditioner": "raw"})
    words = ["the", "cat", "sat"]
    page = s.report(
        tmp_path / "report.html",
        k=2,
        render=lambda i: (
            render.image(checkerboard(), size=96) if i != 11 else render.tokens(words, [1, -2, 0.5])
        ),
        render_query=lambda q: render.text(f"query {q}"),
    )
    got = load(page, tmp_path / "browser", size=(1400, 1400))
    assert got.console == []  # no errors or messages of any kind
    assert got.dom.count('class="card helpful"') == 4 and got.dom.count('class="card harmful"') == 4
    assert got.dom.count('class="tok"') == 3 * 2  # id 11 is second-best in both queries
    # 6 images of 8×8 cells at 96 px: 32 magenta cells of 12×12 px each, square and unsmoothed
    assert colour_count(got.screenshot, MAGENTA) >= 0.95 * 6 * 32 * 144
    assert colour_count(got.screenshot, MAGENTA) <= 6 * 32 * 144


def test_the_browser_check_sees_console_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>missing();</script></body></html>")
    got = load(bad, tmp_path / "browser")
    assert any("missing is not defined" in line for line in got.console)


def test_a_renderer_naming_query_id_gets_the_query(scores, tmp_path):
    seen = []

    def draw(train_id, query_id):
        seen.append((query_id, train_id))
        return render.tokens([str(train_id), str(query_id)], [1.0, -1.0])

    scores.report(tmp_path / "q.html", k=2, render=draw)
    want = scores.top_k(2)
    bad = scores.top_k(2, harmful=True)
    assert seen == [
        (q, t) for i, q in enumerate(scores.query_ids) for t in want.train_ids[i] + bad.train_ids[i]
    ]
