"""The coverage table `run.watch` prints: watched modules by type, and every parameter that is
not captured, grouped by module type, with its share of the model's parameters (rich, stderr)."""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from logix.capture.coverage import Coverage, UncoveredGroup

MOST_ROWS = 8  # uncovered groups shown; the rest are summed into one row


def coverage_table(coverage: Coverage) -> Table:
    """The table: one row per captured type, one per uncovered (type, reason) group."""
    c = coverage
    table = Table(show_edge=False, pad_edge=False)
    for column in ("", "type", "modules", "parameters", "share", "why / fix"):
        table.add_column(column, justify="right" if column in ("parameters", "share") else "left")
    for kind, count in sorted(c.captured.items(), key=lambda kv: -c.captured_by_type.get(kv[0], 0)):
        n = c.captured_by_type.get(kind, 0)
        table.add_row("captured", kind, str(count), f"{n:,}", _share(n, c.total_parameters), "")
    shown, rest = c.uncovered[:MOST_ROWS], c.uncovered[MOST_ROWS:]
    for group in shown:
        table.add_row(*_uncovered_row(group))
    if rest:
        n = sum(g.parameters for g in rest)
        table.add_row(
            "not captured", f"{len(rest)} more", "", f"{n:,}", _share(n, c.total_parameters), "run.coverage()"
        )
    return table


def _uncovered_row(group: UncoveredGroup) -> tuple[str, ...]:
    names = ", ".join(group.modules[:2])
    if len(group.modules) > 2:
        names += f", … ({len(group.modules)})"
    style = "" if group.on_purpose or not group.matrix_parameters else "[yellow]"
    why = group.reason if group.on_purpose else f"{group.reason}; {group.fix()}"
    return (
        f"{style}not captured",
        escape(group.type),
        escape(names),
        f"{group.parameters:,}",
        f"{group.share:.1%}",
        escape(why),
    )


def headline(coverage: Coverage) -> str:
    c = coverage
    n = len(c.captured_modules)
    return (
        f"logix watches {n} module{'s' if n != 1 else ''}: {c.matrix_share:.1%} of the matrix "
        f"parameters, {c.share:.1%} of all {c.total_parameters:,} parameters"
    )


def _share(n: int, total: int) -> str:
    return f"{n / total:.1%}" if total else "-"


def print_coverage(coverage: Coverage, file: TextIO | None = None) -> None:
    """Print the coverage table to `file` (stderr by default)."""
    console = Console(file=file if file is not None else sys.stderr, width=150, soft_wrap=False)
    console.print(escape(headline(coverage)))
    console.print(coverage_table(coverage))
