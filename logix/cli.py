"""`logix` command line: `logix inspect RUN_DIR`, `logix query RUN_DIR --queries FILE`.

Each subcommand lives in `logix/commands/<name>.py` and exposes `add_arguments(parser)` and
`main(args) -> int`; this file only dispatches, so that `logix --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "inspect": "summarise a store: modules, ranks, rows, segments, dtype, size, integrity",
    "query": "score query gradients against a store and print the top influential examples",
    "index": "build or describe a store's approximate (FAISS) index for fast top-k",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logix", description="Training data attribution.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f"logix.commands.{name}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"logix.commands.{args.command}")
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
