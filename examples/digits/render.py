"""How the digits look in a `logix report`: ids are row numbers of the training and test
splits of `common.load_digits()` (the ids the demo logs and queries with).

    logix report examples/digits/out/run --queries examples/digits/out/queries.safetensors \
        --render examples/digits/render.py:train_image \
        --render-query examples/digits/render.py:test_image -o examples/digits/out/report.html
"""

from __future__ import annotations

import html
import sys
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_digits  # noqa: E402

import logix  # noqa: E402


@cache
def digits():
    return load_digits()


def drawn(pixels, caption: str) -> logix.render.Html:
    """An 8×8 image, dark ink on white, square pixels, with a caption under it."""
    image = logix.render.image(pixels.reshape(8, 8), vmin=0, vmax=1, invert=True, size=96)
    return logix.render.Html(f'{image}<div class="caption">{html.escape(caption)}</div>')


def train_image(i) -> logix.render.Html:
    data = digits()
    return drawn(data.x_train[int(i)], f"label {int(data.y_train[int(i)])}")


def test_image(i, predicted: int | None = None) -> logix.render.Html:
    data = digits()
    label = int(data.y_test[int(i)])
    guess = "" if predicted is None else f", predicted {predicted}" + (" ✗" if predicted != label else "")
    return drawn(data.x_test[int(i)], f"test #{int(i)}: label {label}{guess}")
