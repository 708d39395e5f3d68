"""What every querying command shares: the engine's options (help generated from the one source
of defaults, `QueryConfig` and `vocabulary.py`), the engine built from them with the store's
defaults (`query/defaults.py`, as `InfluenceEngine(store)` does), queries, outputs, errors.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from logix.config import QueryConfig
from logix.errors import LogixError
from logix.query.transfer import DEFAULT_CHUNK_BYTES
from logix.vocabulary import PRECONDITIONERS, QUERY_FISHERS, SCORE_MODES

# What a command reports as one red line and exit code 2 (anything else is a bug: a traceback).
USER_ERRORS = (LogixError, ValueError, TypeError, OSError, KeyError, ImportError)

_WHAT = {
    "mode": f"score mode: {' | '.join(SCORE_MODES)}",
    "preconditioner": f"{' | '.join(PRECONDITIONERS)}: (F + λI)⁻¹ of the curvature",
    "damping": "damping, relative to each module's mean curvature eigenvalue (see --absolute-damping)",
    "refine": "ekfac only: K passes over the store refining the queries towards the exact raw solve",
    "fisher": f"{' | '.join(QUERY_FISHERS)}: the curvature's labels, the data's (empirical) or the "
    "model's (true, from a run.fit_curvature pass; auto: true when the store holds it)",
}


# What a result can be saved as from the command line, in the order help lists them (the formats
# of query/result_files.py: CSV for spreadsheets first).
OUTPUTS = (".csv", ".json", ".safetensors", ".npz")


def default_help(name: str) -> str:
    """`what (default: the store's query.<name>, else <QueryConfig default>)`."""
    default = {f.name: f.default for f in fields(QueryConfig)}[name]
    when = " when the preconditioner is ekfac" if name == "refine" else ""
    return f"{_WHAT[name]} (default: the store's query.{name}{when}, else {default})".replace("%", "%%")


def add_run_dir(parser: argparse.ArgumentParser, queries: bool = True) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a store directory (the logix.init path)")
    if queries:
        parser.add_argument(
            "--queries",
            required=True,
            metavar="FILE",
            help="query gradients saved with run.gradients().save(FILE) from a query-mode run",
        )


def add_engine_options(parser: argparse.ArgumentParser, modes: tuple[str, ...] = SCORE_MODES) -> None:
    """The engine's options, each defaulting to the store's `query:` config."""
    mode_help = default_help("mode") if modes == SCORE_MODES else f"{' | '.join(modes)} (default: dot)"
    parser.add_argument("--mode", help=mode_help)
    for name in ("preconditioner", "damping", "refine", "fisher"):
        kind = {"damping": float, "refine": int}.get(name, str)
        metavar = {"damping": "λ", "refine": "K"}.get(name)
        parser.add_argument(f"--{name}", type=kind, metavar=metavar, help=default_help(name))
    parser.add_argument(
        "--absolute-damping",
        action="store_true",
        help="use --damping as an absolute λ instead of a relative one",
    )
    parser.add_argument("--segment", help="store segment to query (default: the last one)")
    parser.add_argument("--modules", help="comma-separated module names (default: all)")
    parser.add_argument(
        "--chunk-bytes",
        type=int,
        metavar="N",
        help=f"bytes of train rows (as float32) per matrix product (default {DEFAULT_CHUNK_BYTES >> 20} MiB)",
    )
    parser.add_argument("--device", help="cpu | cuda | cuda:1 (default: cuda when available, else cpu)")
    add_quiet(parser)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def check_device(device: str | None) -> None:
    """A CUDA device asked for on a machine without one: one clear error before any work."""
    if device is None or not str(device).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise LogixError(
            f"--device {device}: this machine has no CUDA device (torch.cuda.is_available() is "
            "False); use --device cpu, or leave --device out"
        )


def check_output(path: str | None, allowed: tuple[str, ...]) -> None:
    if path is not None and Path(path).suffix.lower() not in allowed:
        raise ValueError(f"--output {path}: use a file name ending in {' / '.join(allowed)}")


def load_queries(path: str) -> Any:
    from logix.store.gradients import Gradients

    if not Path(path).is_file():
        raise ValueError(
            f"queries file {path} does not exist (save one with run.gradients().save(FILE) "
            "from a query-mode run)"
        )
    return Gradients.load(path)


def open_engine(args: argparse.Namespace, console: Console) -> Any:
    """The engine the options ask for, with the store's defaults for whatever they leave out,
    drawing progress bars on stderr unless --quiet."""
    from logix.progress import ProgressBars
    from logix.query.engine import InfluenceEngine
    from logix.store.reader import open_store

    check_device(args.device)
    store = open_store(args.run_dir, segment=args.segment)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else None
    chunk = {} if args.chunk_bytes is None else {"chunk_bytes": args.chunk_bytes}
    return InfluenceEngine(
        store,
        absolute_damping=args.absolute_damping,
        modules=modules,
        device=args.device,
        progress=ProgressBars(quiet=args.quiet),
        preconditioner=args.preconditioner,  # None: the store's default, resolved by the engine
        damping=args.damping,
        refine=args.refine,
        fisher=args.fisher,
        mode=args.mode,
        **chunk,
    )


def negated(q: Any) -> Any:
    """The queries with their gradients' signs flipped: every score mode is odd in q (the
    preconditioned product, the cosine's norm and the refinement are), so the top-k of −q is
    the most harmful examples of q, scores negated exactly."""
    from logix.store.gradients import Gradients

    return Gradients(-q.values, list(q.data_ids), q.modules, q.fingerprint, dict(q.meta))


def harmful_top_k(engine: Any, q: Any, k: int, mode: str | None = None) -> Any:
    """Per query the k lowest (most negative) scores, lowest first: a `TopK` like `top_k`'s."""
    worst = engine.top_k(negated(q), k=k, mode=mode)
    worst.values = -worst.values
    return worst


def run_command(body: Callable[[], int], console: Console) -> int:
    """`body()`, with a user error (bad input, a damaged store, a missing file) printed as one
    red line and exit code 2 instead of a traceback."""
    try:
        return int(body() or 0)
    except USER_ERRORS as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
