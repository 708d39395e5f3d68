"""The demo's picture (`report.png`, needs matplotlib): per test image its most helpful and most
harmful training images, each score divided by that test image's largest |score| (so rows are
comparable whatever the mode's units; the raw score is printed under it), square unsmoothed 8×8
pixels, and a legend saying what the signs and colours mean."""

from __future__ import annotations

from pathlib import Path

import torch


def draw_report(path: Path, data, queries, preds, scores: torch.Tensor, helpful, harmful) -> bool:
    """scores [n_query, n_train] by training-set index; helpful / harmful [n_query, k] indices.
    False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    k = helpful.shape[1]
    cols = 1 + 2 * k
    fig, axes = plt.subplots(
        len(queries), cols, figsize=(1.3 * cols + 0.4, 1.75 * len(queries) + 1.5), squeeze=False
    )
    for r, q in enumerate(queries):
        row = axes[r]
        peak = float(scores[r].abs().max()) or 1.0
        show(row[0], data.x_test[q])
        ok = preds[r] == int(data.y_test[q])
        row[0].set_title(
            f"test #{q}\nlabel {int(data.y_test[q])}, pred {preds[r]}",
            fontsize=8,
            color="black" if ok else "red",
            fontweight="bold",
        )
        for j in range(k):
            for idx, ax, colour in (
                (helpful[r, j], row[1 + j], "tab:green"),
                (harmful[r, j], row[1 + k + j], "tab:red"),
            ):
                i = int(idx)
                show(ax, data.x_train[i])
                value = float(scores[r, i])
                ax.set_title(
                    f"#{i} label {int(data.y_train[i])}\n{value / peak:+.2f}", fontsize=7, color=colour
                )
                ax.set_xlabel(f"raw {value:+.3g}", fontsize=6, color="dimgray", labelpad=1)
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(1.5)
    top = 1 - 0.55 / fig.get_figheight()
    for x, text, colour in (
        (0.5 * (1 + k) / cols, "most helpful training images →", "tab:green"),
        ((1 + 1.5 * k) / cols, "most harmful training images →", "tab:red"),
    ):
        fig.text(
            x,
            top + 0.3 / fig.get_figheight(),
            text,
            ha="center",
            va="top",
            color=colour,
            fontsize=10,
            fontweight="bold",
        )
    fig.text(
        0.01,
        0.01,
        "green: helpful (positive score: up-weighting that training image lowers the test image's loss); "
        "red: harmful (negative: raises it).\n"
        "Each number is the score divided by the largest |score| of that test image (+1.00 = its most "
        "helpful image), so rows compare; the raw score is under each image.",
        fontsize=7,
        va="bottom",
        ha="left",
    )
    fig.tight_layout(rect=(0, 0.9 / fig.get_figheight(), 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def show(ax, pixels: torch.Tensor) -> None:
    """An 8×8 digit: dark ink on white, square pixels, no smoothing, no ticks."""
    ax.imshow(pixels.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
