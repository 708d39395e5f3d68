"""Typed configuration: dataclasses that load from and save to YAML or dicts, with clear errors.

Every key is documented in `configs/default.yaml`. An unknown key is an error naming the closest
valid key; a value of the wrong type or outside its choices is an error naming what is expected.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from logix.errors import ConfigError
from logix.vocabulary import (
    LAYER_TYPES,
    LOSS_REDUCTIONS,
    PRECONDITIONERS,
    PROJECTION_KINDS,
    QUERY_FISHERS,
    SCORE_MODES,
    STATISTICS,
    STORAGE_DTYPES,
    UNCOVERED_MODES,
    UNFIRED_MODES,
)

__all__ = ["ConfigError", "LogixConfig"]


_CASE_NOTES = {
    "conv1d": "'Conv1d' is torch.nn.Conv1d, 'Conv1D' is Hugging Face's GPT-2 layer (weight [d_in, d_out])"
}


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass
class CaptureConfig:
    """Which modules are watched and how their gradients are read."""

    types: list[str] = field(
        default_factory=lambda: list(LAYER_TYPES),
        metadata={"each_of": LAYER_TYPES},
    )
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    bias: bool = True
    loss_reduction: str = field(default="mean", metadata=_choices(*LOSS_REDUCTIONS))
    attribution_only: bool = False
    # What a matrix parameter (ndim >= 2) that no watched module captures does at watch: a notice
    # (the coverage table) or an error; a parameter matched by `exclude` is never an error.
    uncovered: str = field(default="notice", metadata=_choices(*UNCOVERED_MODES))
    # A watched module the first block's backward never reached: an error, or a warning.
    unfired: str = field(default="error", metadata=_choices(*UNFIRED_MODES))
    check_loss: bool = True  # check the loop's loss reduction on the first block (capture/loss_probe.py)


@dataclass
class ProjectionConfig:
    """The LoGra projections P_in [rank_in, d_in] and P_out [rank_out, d_out]."""

    kind: str = field(default="random", metadata=_choices(*PROJECTION_KINDS))
    rank_in: int = field(default=64, metadata={"min": 1})
    rank_out: int = field(default=64, metadata={"min": 1})
    seed: int = 0
    # kfac-whitened: each side's K-FAC factor is damped by damping × its mean eigenvalue.
    damping: float = field(default=1e-4, metadata={"min": 0.0})


@dataclass
class StoreConfig:
    """How rows are written to disk."""

    dtype: str = field(default="float32", metadata=_choices(*STORAGE_DTYPES))
    shard_rows: int = field(default=4096, metadata={"min": 1})


@dataclass
class CurvatureConfig:
    """Which curvature statistics are accumulated while logging."""

    statistics: list[str] = field(default_factory=lambda: ["raw"], metadata={"each_of": STATISTICS})
    during_logging: bool = False


@dataclass
class QueryConfig:
    """Defaults for the query engine."""

    preconditioner: str = field(default="raw", metadata=_choices(*PRECONDITIONERS))
    damping: float = field(default=0.1, metadata={"min": 0.0})
    refine: int = field(default=0, metadata={"min": 0})
    fisher: str = field(default="auto", metadata=_choices(*QUERY_FISHERS))
    mode: str = field(default="dot", metadata=_choices(*SCORE_MODES))


@dataclass
class LogixConfig:
    """The whole configuration; `LogixConfig.load(x)` accepts a path, a dict or a LogixConfig."""

    capture: CaptureConfig = field(default_factory=CaptureConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    query: QueryConfig = field(default_factory=QueryConfig)

    @classmethod
    def load(cls, source: LogixConfig | dict | str | Path | None) -> LogixConfig:
        if source is None:
            return cls()
        if isinstance(source, LogixConfig):
            return cls.from_dict(source.to_dict())
        if isinstance(source, (str, Path)):
            return cls.from_yaml(source)
        if isinstance(source, dict):
            return cls.from_dict(source)
        raise ConfigError(
            f"config must be a path to a YAML file, a dict or a LogixConfig, not {type(source).__name__}"
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> LogixConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path} is not a text file (byte {e.start} is not UTF-8): pass the path of a YAML "
                "config such as configs/default.yaml"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        try:
            return cls.from_dict(data or {})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogixConfig:
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass `cls` from `data`, checking keys, types and choices."""
    label = where or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping of keys to values, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            prefix = f"{where}." if where else ""
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown key '{prefix}{key}'{hint} "
                f"(valid keys{' of ' + where if where else ''}: {', '.join(known)})"
            )
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        path = f"{where}.{name}" if where else name
        kwargs[name] = _check_value(hints[name], data[name], path, f.metadata)
    return cls(**kwargs)


def _check_value(hint: Any, value: Any, path: str, meta: Any) -> Any:
    if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
        return _build(hint, value if value is not None else {}, path)
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path} must be a list of strings, got {value!r}")
        allowed = meta.get("each_of")
        for v in value:
            if allowed and v not in allowed:
                raise ConfigError(f"{path}: {v!r} is not one of {list(allowed)}{_suggest(v, allowed)}")
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{path} must be a finite number, got {value!r}")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        allowed = meta.get("choices")
        if allowed and value not in allowed:
            raise ConfigError(
                f"{path} must be one of {list(allowed)}, got {value!r}{_suggest(value, allowed)}"
            )
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{path} must be at least {meta['min']}, got {value!r}")
    return value


def _suggest(value: str, allowed: Any) -> str:
    same = [a for a in allowed if a.lower() == value.lower()]
    if len(same) > 1:  # names that differ only in case (Conv1D, Hugging Face's; Conv1d, torch's)
        return f" (did you mean {' or '.join(repr(a) for a in same)}? {_CASE_NOTES.get(value.lower(), '')})"
    close = difflib.get_close_matches(value, list(allowed), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
