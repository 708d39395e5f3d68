"""Logging overhead of a model built from nn.TransformerEncoderLayer (nn.MultiheadAttention,
whose q, k, v and out projections logix captures through a TorchFunctionMode around each
attention layer's forward), measured in one run:

    python benchmarks/bench_attention.py            # a table of logged / plain ratios
    python benchmarks/bench_attention.py --quick

(a) every layer watched, attention included; (b) the same model with the attention layers
excluded (`capture.exclude: ["*.self_attn*"]`), i.e. without the interception: the difference of
the two ratios is what capturing attention costs. Plain and logged steps are interleaved.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_logging import measure  # noqa: E402


class EncoderLM(nn.Module):
    """Tokens [B, T] -> logits [B, T, vocab] through causal nn.TransformerEncoderLayers."""

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True)
            for _ in range(n_layers)
        )
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        x = self.tok(tokens)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(x)


def encoder_case(exclude: list[str], batch: int = 16, seq: int = 128, vocab: int = 512):
    def case():
        torch.manual_seed(0)
        model = EncoderLM(vocab, 256, 4, 4)
        data = [(torch.randint(0, vocab, (batch, seq)),) for _ in range(4)]

        def loss(m, xy):
            logits = m(xy[0][:, :-1])
            return F.cross_entropy(logits.reshape(-1, vocab), xy[0][:, 1:].reshape(-1))

        cfg = {"projection": {"rank_in": 32, "rank_out": 32}, "capture": {"exclude": exclude}}
        return model, data, loss, cfg

    return case


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    args = ap.parse_args(argv)
    rounds, steps = (3, 2) if args.quick else (7, 4)
    with tempfile.TemporaryDirectory() as d:
        rows = [
            measure("encoder d256 L4 T128 b16, attention captured", encoder_case([]), steps, rounds, Path(d)),
            measure("  same, attention excluded", encoder_case(["*.self_attn*"]), steps, rounds, Path(d)),
        ]
    table = Table(
        title=f"attention capture overhead (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    for col in ("case", "plain ms/step", "logged ms/step", "logged / plain"):
        table.add_column(col, justify="right" if col != "case" else "left")
    for r in rows:
        table.add_row(r["name"], f"{r['plain_ms']:.1f}", f"{r['logged_ms']:.1f}", f"{r['ratio']:.2f}x")
    Console(width=110).print(table)


if __name__ == "__main__":
    main()
