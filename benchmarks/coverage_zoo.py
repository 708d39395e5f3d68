"""Coverage of full-size models under the default config: the share of matrix parameters
(ndim >= 2) and of all parameters that `run.watch` captures, and what it does not (the figures
in docs/logging.md "Measured coverage"). Models are built on the meta device (shapes only, no
memory, no downloads); needs `transformers` for the Hugging Face rows.

    .venv/bin/python benchmarks/coverage_zoo.py        # a few seconds
"""

from __future__ import annotations

import torch
from torch import nn

from logix.capture.attention import attention_parameters
from logix.capture.coverage import model_coverage
from logix.capture.modules import select_modules
from logix.config import CaptureConfig


def row(name: str, model: nn.Module) -> str:
    cfg = CaptureConfig()
    selected = select_modules(model, cfg)
    c = model_coverage(model, selected, cfg, also_captured=attention_parameters(selected, cfg.bias))
    missing = "; ".join(f"{g.type} {g.share:.2%}" for g in c.uncovered) or "-"
    return f"| {name} | {c.total_parameters:,} | {c.matrix_share:.2%} | {c.share:.2%} | {missing} |"


def separable(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    """A depthwise 3x3 then pointwise 1x1 convolution, each with BatchNorm (MobileNet v1)."""
    return [
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class RecurrentLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10000, 256)
        self.rnn = nn.LSTM(256, 512, 2, batch_first=True)
        self.norm = nn.LayerNorm(512)
        self.head = nn.Linear(512, 10000)


def models() -> dict[str, nn.Module]:
    widths = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
    widths += [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
    out = {
        "MobileNet-v1-style (depthwise-separable Conv2d + BatchNorm)": nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False),
            *[layer for w in widths for layer in separable(*w)],
            nn.Flatten(),
            nn.Linear(1024, 1000),
        ),
        "Conv1d TCN (dilated, grouped) + Linear": nn.Sequential(
            nn.Conv1d(40, 128, 5, padding=2),
            nn.Conv1d(128, 128, 3, dilation=2, padding=2),
            nn.Conv1d(128, 128, 3, groups=4, padding=1),
            nn.Flatten(),
            nn.Linear(128 * 100, 10),
        ),
        "Embedding + 2-layer LSTM + LayerNorm + Linear": RecurrentLM(),
        "nn.TransformerEncoder (2 layers, d = 256)": nn.TransformerEncoder(
            nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True), 2
        ),
    }
    try:
        import transformers
    except ImportError:
        return out
    return {
        "GPT-2 small (GPT2LMHeadModel, untied head)": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(tie_word_embeddings=False)
        ),
        "BERT-base (BertForSequenceClassification)": transformers.BertForSequenceClassification(
            transformers.BertConfig()
        ),
        "ViT-B/16 (ViTForImageClassification)": transformers.ViTForImageClassification(
            transformers.ViTConfig()
        ),
        **out,
    }


def main() -> None:
    print("| model | parameters | matrix parameters captured | all parameters captured | not captured |")
    print("|---|---|---|---|---|")
    with torch.device("meta"):
        for name, model in models().items():
            print(row(name, model))


if __name__ == "__main__":
    main()
