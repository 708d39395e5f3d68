"""`logix query RUN_DIR --queries FILE --top-k K`: the first name of `logix top-k` (same options)."""

from __future__ import annotations

from logix.commands.top_k import add_arguments, main

__all__ = ["add_arguments", "main"]
