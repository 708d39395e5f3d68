"""`logix` command line: `logix inspect RUN_DIR`, `logix top-k` / `scores` / `self-influence` /
`report RUN_DIR ...`, `logix --version`.

Each subcommand lives in `logix/commands/<name>.py` (a dash in its name is an underscore there)
and exposes `add_arguments(parser)` and `main(args) -> int`; this file only dispatches, so that
`logix --help` stays fast. A LogixError that escapes a command is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from logix.errors import LogixError
from logix.version import __version__

COMMANDS = {
    "inspect": "summarise a store: modules, ranks, rows, segments, dtype, size, integrity",
    "top-k": "the most influential (or, --harmful, most harmful) training examples of each query",
    "scores": "the full score matrix of query gradients against a store, saved to a file",
    "self-influence": "the self-influence I(z, z) of every training example (outliers, mislabels)",
    "report": "an HTML page of each query's most helpful and most harmful training examples",
    "query": "the first name of top-k (same options)",
    "index": "build or describe a store's approximate (FAISS) index for fast top-k",
}


def command_module(name: str):
    return importlib.import_module(f"logix.commands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logix", description="Training data attribution.")
    parser.add_argument("--version", action="version", version=f"logix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        command_module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(command_module(args.command).main(args) or 0)
    except LogixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
