"""An HTML report people can look at: one self-contained page (inline CSS and images, no
script, nothing fetched) with, per query, its most helpful and most harmful training examples.

Scores are shown on a comparable scale: each divided by the largest |score| among the examples
shown for that query, so +1.00 is that query's most helpful example whatever the mode's units
(a relative-mode score of +497 in one row and +0.008 in another are both +1.00 when they top
their rows); the raw score is printed beside it. A positive score means the training example
helps the query (up-weighting it lowers the query's loss), a negative one that it harms it.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

from logix.query.render import rendered, show_id
from logix.store.format import write_atomic

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #111; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; } .sub { color: #555; margin-bottom: 16px; }
.legend { border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; margin-bottom: 20px;
  background: #fafafa; max-width: 900px; } .legend p { margin: 4px 0; }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px; vertical-align: -2px; }
.help { background: #16a34a; } .harm { background: #dc2626; }
section.query { border-top: 2px solid #ccc; padding: 12px 0 18px; }
.qhead { display: flex; gap: 14px; align-items: center; margin-bottom: 8px; }
.qhead h2 { font-size: 16px; margin: 0; }
.sides { display: flex; flex-wrap: wrap; gap: 8px 32px; }
.side h3 { font-size: 13px; margin: 8px 0 4px; text-transform: uppercase; letter-spacing: .04em; }
.side.helpful h3 { color: #15803d; } .side.harmful h3 { color: #b91c1c; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 6px; width: 136px; background: #fff; }
.card:has(.tokens), .card:has(.text) { width: 320px; }
.card.helpful { border-top: 4px solid #16a34a; } .card.harmful { border-top: 4px solid #dc2626; }
.card .id { font: 12px ui-monospace, monospace; color: #333; overflow-wrap: anywhere; }
.bar { height: 6px; background: #eee; border-radius: 3px; margin: 4px 0 2px; }
.bar > div { height: 6px; border-radius: 3px; }
.score { font-weight: 600; } .raw { color: #666; font-size: 12px; }
img.pixels { image-rendering: pixelated; image-rendering: crisp-edges; display: block;
  border: 1px solid #ccc; }
.tokens { font: 12px ui-monospace, monospace; white-space: pre-wrap; overflow-wrap: anywhere; }
.tok { border-radius: 2px; } .text { white-space: pre-wrap; overflow-wrap: anywhere; }
.caption { font-size: 12px; color: #333; margin-top: 2px; }
.id-only { font: 13px ui-monospace, monospace; padding: 4px 0; }
"""


def write_report(
    path: str | Path,
    helpful: Any,
    harmful: Any = None,
    *,
    render: Callable[[Any], Any] | None = None,
    render_query: Callable[[Any], Any] | None = None,
    title: str = "Which training examples made the model do this?",
) -> Path:
    """Write the page to `path` (.html) and return it.

    helpful: a `TopK` (values/indices [n_query, k], best first); harmful: optionally a `TopK` of
    the same queries, most negative first (`scores.top_k(k, harmful=True)`). render: train id ->
    HTML (`logix.query.render`; default: the id; one with a `query_id` parameter also gets the
    query's id), render_query: the same for query ids (default: the id only in the heading)."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"a report is an HTML page: name it *.html, got {path}")
    if harmful is not None and list(harmful.query_ids) != list(helpful.query_ids):
        raise ValueError("helpful and harmful lists are of different queries")
    render = render or show_id
    meta = dict(helpful.meta)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<div class="sub">{html.escape(_summary(helpful, meta))}</div>',
        _legend(helpful.mode, harmful is not None),
    ]
    for i, qid in enumerate(helpful.query_ids):
        shown = helpful.values[i].tolist()
        if harmful is not None:
            shown += harmful.values[i].tolist()
        peak = max((abs(v) for v in shown), default=0.0)
        head = "" if render_query is None else rendered(render_query, qid)
        parts.append(
            f'<section class="query"><div class="qhead">{head}<h2>query {html.escape(str(qid))}</h2></div>'
        )
        parts.append('<div class="sides">')
        parts.append(_side("most helpful", "helpful", helpful, i, peak, render, qid))
        if harmful is not None:
            parts.append(_side("most harmful", "harmful", harmful, i, peak, render, qid))
        parts.append("</div></section>")
    parts.append("</body></html>")
    page = "\n".join(parts) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def _summary(top: Any, meta: dict) -> str:
    bits = [f"{len(top.query_ids)} queries", f"mode {top.mode}"]
    for key in ("preconditioner", "fisher", "segment"):
        if meta.get(key) is not None:
            bits.append(f"{key} {meta[key]}")
    return " · ".join(bits)


def _legend(mode: str, with_harmful: bool) -> str:
    harm = (
        '<p><span class="swatch harm"></span> <b>harmful</b> (negative score): up-weighting this '
        "training example would raise the query's loss.</p>"
        if with_harmful
        else "<p>Only the most helpful examples are listed (a top-k); the report of a full score "
        "matrix also shows the most harmful ones.</p>"
    )
    return (
        '<div class="legend">'
        '<p><span class="swatch help"></span> <b>helpful</b> (positive score): up-weighting this '
        "training example would lower the query's loss; it pulls the model towards the query's "
        "answer.</p>"
        f"{harm}"
        "<p><b>Scale.</b> The large number and the bar are the score divided by the largest "
        "|score| among the examples shown for that query: +1.00 is that query's most helpful "
        "example, −1.00 its most harmful, whatever the size of the query's own gradient. "
        f"The raw score (mode <i>{html.escape(mode)}</i>) is shown small beside it; compare raw "
        "scores only within one query.</p></div>"
    )


def _side(
    heading: str, kind: str, top: Any, i: int, peak: float, render: Callable[..., Any], qid: Any
) -> str:
    cards = []
    for tid, value, index in zip(top.train_ids[i], top.values[i].tolist(), top.indices[i].tolist()):
        scaled = value / peak if peak > 0 else 0.0
        colour = "#16a34a" if value >= 0 else "#dc2626"
        cards.append(
            f'<div class="card {kind}">{rendered(render, tid, qid)}'
            f'<div class="id">id {html.escape(str(tid))} · row {int(index)}</div>'
            f'<div class="bar"><div style="width:{abs(scaled) * 100:.1f}%;background:{colour}"></div></div>'
            f'<span class="score">{scaled:+.2f}</span> <span class="raw">raw {value:+.4g}</span></div>'
        )
    return f'<div class="side {kind}"><h3>{heading}</h3><div class="cards">{"".join(cards)}</div></div>'
