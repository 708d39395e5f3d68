"""The tiny language model of examples/tiny_lm, for tests: its corpus, batching and a store of
its documents."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import logix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "tiny_lm"))

import corpus as C  # noqa: E402
from fact_tracing import document_batch, question_batch, sequence_losses  # noqa: E402
from models import TinyDecoder  # noqa: E402

__all__ = ["C", "TinyDecoder", "document_batch", "log_documents", "question_batch", "sequence_losses"]


def log_documents(
    model: torch.nn.Module, corpus: C.Corpus, run_dir: Path, config: dict, batch_size: int = 8
) -> Path:
    """Log one row per document (its summed token loss, padding masked) into a new store."""
    run = logix.init(run_dir, config=config)
    run.watch(model)
    for start in range(0, len(corpus.documents), batch_size):
        chunk = corpus.documents[start : start + batch_size]
        b = document_batch(corpus, [d.text for d in chunk])
        with run(data_id=[d.doc_id for d in chunk], mask=b.pad_mask):
            sequence_losses(model, b).mean().backward()
    run.finalize()
    return run_dir
