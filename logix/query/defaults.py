"""The query defaults of a store: the `query:` section of the config it was logged with, filled
in from `QueryConfig`; read by `InfluenceEngine` alone (the CLI, `combined_scores` and
`stagewise_scores` build engines), so all give the same answer for the same store."""

from __future__ import annotations

from typing import Any

from logix.config import LogixConfig, QueryConfig


def query_defaults(store: Any) -> QueryConfig:
    """The store's resolved `query:` config (validated: a bad value is a ConfigError)."""
    section = (getattr(store, "config", None) or {}).get("query") or {}
    return LogixConfig.from_dict({"query": dict(section)}).query


def resolve(
    store: Any,
    preconditioner: str | None,
    damping: float | None,
    refine: int | None,
    fisher: str | None,
    mode: str | None,
) -> dict[str, Any]:
    """Each argument given, else the store's configured default. The config's `refine` belongs
    to its own preconditioner: it applies only when the preconditioner is ekfac."""
    config = query_defaults(store)
    preconditioner = config.preconditioner if preconditioner is None else preconditioner
    if refine is None:
        refine = config.refine if preconditioner == "ekfac" else 0
    return {
        "preconditioner": preconditioner,
        "damping": config.damping if damping is None else damping,
        "refine": refine,
        "fisher": config.fisher if fisher is None else fisher,
        "mode": config.mode if mode is None else mode,
    }
