"""How an example looks in an HTML report: renderers map a data id to a piece of HTML.

A renderer is any `fn(data_id) -> Html | str | array`: an `Html` is placed as it is, a `str`
is shown as escaped text, an array (numpy or torch, [H, W] or [H, W, 3]) is drawn as an image.
A train-side renderer with a parameter named `query_id` is called `fn(train_id, query_id=q)`:
what it draws may depend on the query (e.g. per-token scores of that query and that document).
The helpers build the common kinds, each self-contained (images are inline PNG data URIs):

    report(path, render=lambda i: logix.render.image(x_train[i].reshape(8, 8)))
    render=lambda i: logix.render.tokens(words[i], token_scores[i])   # per-token highlights
"""

from __future__ import annotations

import base64
import html
import inspect
import struct
import zlib
from typing import Any

import numpy as np


class Html(str):
    """Markup placed in the page as it is (built by these helpers, or by you: escape what you
    put in it with `html.escape`)."""


def show_id(data_id: Any) -> Html:
    """The default renderer: the id itself."""
    return Html(f'<div class="id-only">{html.escape(str(data_id))}</div>')


def text(value: str) -> Html:
    """Plain text, escaped, line breaks kept."""
    return Html(f'<div class="text">{html.escape(str(value))}</div>')


def png(pixels: np.ndarray) -> bytes:
    """A PNG file of `pixels` [H, W] (grey) or [H, W, 3] (RGB), uint8; no imaging library."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        colour = 0
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour = 2
    else:
        raise ValueError(f"an image is [H, W] or [H, W, 3]; got shape {pixels.shape}")
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))  # filter 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def image(
    pixels: Any, *, size: int = 96, vmin: float | None = None, vmax: float | None = None, invert: bool = False
) -> Html:
    """An image, drawn `size` CSS pixels on its longer side with square pixels and no smoothing
    (an 8×8 digit stays 8×8 blocks). pixels: [H, W] or [H, W, 3], numpy or torch; floats are
    mapped from [vmin, vmax] (default: their min and max) to black..white, `invert` for dark ink."""
    a = pixels.detach().cpu().numpy() if hasattr(pixels, "detach") else np.asarray(pixels)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[2] != 3:
        a = np.moveaxis(a, 0, -1)  # [3, H, W] -> [H, W, 3]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo = float(np.nanmin(a)) if vmin is None else float(vmin)
        hi = float(np.nanmax(a)) if vmax is None else float(vmax)
        a = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        a = np.round(a * 255).astype(np.uint8)
    if invert:
        a = 255 - a
    h, w = a.shape[:2]
    scale = size / max(h, w)
    data = base64.b64encode(png(a)).decode("ascii")
    return Html(
        f'<img class="pixels" alt="image {w}×{h}" width="{round(w * scale)}" height="{round(h * scale)}" '
        f'src="data:image/png;base64,{data}">'
    )


def tokens(words: list[str], scores: Any, sep: str = " ") -> Html:
    """Text as its tokens, each highlighted by its score (token attribution: green helps, red
    harms, opacity |score| / the sequence's largest |score|); hovering shows the raw value.
    sep: put between tokens ("" for subword pieces that carry their own spaces)."""
    values = scores.detach().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores, dtype=float)
    values = np.asarray(values, dtype=float).reshape(-1)
    if len(values) != len(words):
        raise ValueError(f"{len(words)} tokens but {len(values)} token scores")
    peak = float(np.abs(values).max()) if len(values) else 0.0
    spans = []
    for word, v in zip(words, values.tolist()):
        alpha = abs(v) / peak if peak > 0 else 0.0
        rgb = "22,163,74" if v >= 0 else "220,38,38"
        spans.append(
            f'<span class="tok" style="background: rgba({rgb},{alpha:.3f})" title="{v:+.4g}">'
            f"{html.escape(str(word))}</span>"
        )
    return Html(f'<div class="tokens">{html.escape(sep).join(spans)}</div>')


def rendered(render: Any, data_id: Any, query_id: Any = None) -> str:
    """The HTML of one example through `render` (see the module doc); `query_id` goes to a
    renderer that names it."""
    out = render(data_id, query_id=query_id) if _takes_query_id(render) else render(data_id)
    if isinstance(out, Html):
        return str(out)
    if isinstance(out, str):
        return str(text(out))
    if hasattr(out, "shape"):
        return str(image(out))
    raise TypeError(
        f"a report renderer returned {type(out).__name__} for id {data_id!r}: return logix.render.Html "
        "(e.g. logix.render.image(...), .tokens(...)), a str, or an image array"
    )


def _takes_query_id(render: Any) -> bool:
    try:
        return "query_id" in inspect.signature(render).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
