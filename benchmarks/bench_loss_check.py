"""The cost of the automatic loss-reduction check (`capture.check_loss`): the time of the first
block of a logging run (forward, loss, backward, rows) with the check on against off, on a small
decoder-like LM (embedding, two hidden Linear layers, a head over the vocabulary), measured in one
run as medians of interleaved repeats (a fresh run directory each time).

    python benchmarks/bench_loss_check.py                 # vocab 8192, B 8, T 128, d 256
    python benchmarks/bench_loss_check.py --vocab 32000 --repeats 7

The check runs on the first block of a pass only, so later blocks cost nothing; the ratio printed
is that of the first block.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import logix
from logix import losses


class LM(nn.Module):
    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.tok(ids))))))


def first_block(model: LM, ids: torch.Tensor, check: bool, root: Path, name: str) -> float:
    config = {"capture": {"check_loss": check}, "projection": {"rank_in": 16, "rank_out": 16}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with logix.init(root / name, config=config) as run:
            run.watch(model)
            start = time.perf_counter()
            with run(data_id=list(range(len(ids)))):
                per = losses.next_token_loss(model(ids), ids, per_example="mean")
                losses.batch_loss(per, run).backward()
            elapsed = time.perf_counter() - start
    model.zero_grad()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LM(args.vocab, args.width)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        first_block(model, ids, False, Path(tmp), "warm-up")
        for r in range(args.repeats):
            for check in (True, False) if r % 2 == 0 else (False, True):
                times[check].append(first_block(model, ids, check, Path(tmp), f"{r}-{check}"))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"first block, vocab {args.vocab}, B {args.batch}, T {args.seq}, d {args.width}: "
        f"check on {on * 1e3:.1f} ms, off {off * 1e3:.1f} ms, ratio {on / off:.2f}x "
        f"(medians of {args.repeats} interleaved repeats, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
