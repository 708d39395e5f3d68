"""Coverage: which of a model's parameters the watched modules capture, and which they do not.

`model_coverage` walks every parameter of the model once (a parameter shared by several modules,
a tied weight, counts once) and sorts it: captured (the weight, and the bias when `capture.bias`,
of a watched module, or a parameter another capture path declares) or not, and then why not
(a layer type logix does not capture, a type left out of `capture.types`, a name no `include`
pattern matches, an explicit `exclude`, a bias with `capture.bias: false`, a frozen parameter).
`Run.watch` prints it as a table (`coverage_table.py`) and `check_uncovered` turns uncovered
matrix parameters (ndim ≥ 2) into an error when `capture.uncovered: error`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from logix.capture.per_sample import layer_type
from logix.capture.wrappers import named_modules
from logix.config import CaptureConfig
from logix.errors import CaptureError

# Why a parameter is not captured, and what would capture it (or say it is on purpose).
NOT_A_LAYER = "a layer type logix does not capture"
NOT_IN_TYPES = "type not in capture.types"
NOT_INCLUDED = "no capture.include pattern matches"
EXCLUDED = "capture.exclude"
BIAS_OFF = "bias (capture.bias: false)"
FROZEN = "frozen (requires_grad=False)"
EXTRA = "not part of the layer's linear map"
MODEL_OWN = "the model's own parameter"
ON_PURPOSE = (EXCLUDED, BIAS_OFF, FROZEN)  # never an error


@dataclass(frozen=True)
class UncoveredGroup:
    """Parameters of one module type that are not captured, for one reason: the names of the
    modules holding them (of the parameters, for the model's own), how many scalars, how many of
    those sit in matrices (ndim ≥ 2), and their share of all the model's parameters."""

    type: str
    reason: str
    modules: tuple[str, ...]
    parameters: int
    matrix_parameters: int
    share: float

    @property
    def on_purpose(self) -> bool:
        """Left out by the config (exclude, bias off) or frozen: never an error."""
        return self.reason in ON_PURPOSE

    def fix(self) -> str:
        """What would capture these parameters, or why they cannot be."""
        if self.reason == NOT_IN_TYPES:
            return f"add {self.type!r} to capture.types"
        if self.reason == NOT_INCLUDED:
            return "match them in capture.include"
        if self.reason in (NOT_A_LAYER, EXTRA, MODEL_OWN):
            return "capture.exclude marks it intended"
        return "left out on purpose"


@dataclass(frozen=True)
class Coverage:
    """What `run.watch` captures of a model: watched modules by type, their parameters, and
    every parameter not captured (grouped by module type and reason), with counts and shares."""

    captured: dict[str, int]  # module type -> watched modules of that type
    captured_by_type: dict[str, int]  # module type -> parameters captured in them
    captured_modules: tuple[str, ...]
    captured_parameters: int
    total_parameters: int
    captured_matrix_parameters: int
    matrix_parameters: int  # in tensors with ndim >= 2
    uncovered: tuple[UncoveredGroup, ...]

    @property
    def share(self) -> float:
        """Captured parameters / all the model's parameters."""
        return self.captured_parameters / self.total_parameters if self.total_parameters else 1.0

    @property
    def matrix_share(self) -> float:
        """Captured matrix parameters / all matrix parameters (ndim ≥ 2) of the model."""
        return self.captured_matrix_parameters / self.matrix_parameters if self.matrix_parameters else 1.0

    def uncovered_matrices(self) -> list[UncoveredGroup]:
        """Groups holding matrix parameters that were not left out on purpose."""
        return [g for g in self.uncovered if g.matrix_parameters and not g.on_purpose]

    def to_dict(self) -> dict:
        return asdict(self) | {"share": self.share, "matrix_share": self.matrix_share}


def _matches(patterns: list[str], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


def _why_not(name: str, module: nn.Module, local: str, trainable: bool, cfg: CaptureConfig) -> str:
    """Why parameter `local` of module `name` is not captured (the module is not watched, or
    the parameter is not part of what a watched module captures)."""
    full = f"{name}.{local}" if name else local
    if _matches(cfg.exclude, name, full):
        return EXCLUDED
    if not trainable:
        return FROZEN
    if not name:
        return MODEL_OWN
    kind = layer_type(module)
    if kind is None:
        return NOT_A_LAYER
    if local not in ("weight", "bias"):
        return EXTRA
    if kind not in cfg.types:
        return NOT_IN_TYPES
    return NOT_INCLUDED  # a layer of a chosen type that is not watched: include left it out


def _parameters(model: nn.Module) -> dict[object, list]:
    """Every distinct parameter of `model`: key -> [holders (module name, module, local name),
    shape, requires_grad]. A parameter shared by several modules (tied) has several holders; an
    FSDP (v1) flat parameter is unpacked into the original parameters it holds."""
    names = {id(m): n for n, m in named_modules(model)}
    entries: dict[object, list] = {}
    for name, module in named_modules(model):
        for local, param in module.named_parameters(recurse=False):
            infos, shapes = getattr(param, "_param_infos", None), getattr(param, "_shapes", None)
            if infos is not None and shapes is not None:
                for info, shape in zip(infos, shapes):
                    owner = info.module
                    entry = entries.setdefault(
                        (id(owner), info.param_name), [[], tuple(shape), param.requires_grad]
                    )
                    entry[0].append((names.get(id(owner), ""), owner, info.param_name))
                continue
            entry = entries.setdefault(id(param), [[], tuple(param.shape), param.requires_grad])
            entry[0].append((name, module, local))
    return entries


def model_coverage(
    model: nn.Module,
    selected: list[tuple[str, nn.Module]],
    cfg: CaptureConfig,
    also_captured: Iterable[tuple[str, str, torch.Tensor]] = (),
) -> Coverage:
    """The coverage of `model` when `selected` (from `select_modules`) are watched.
    `also_captured`: (module name, type label, parameter) triples that another capture path
    records exactly (e.g. a weight used through a functional call it intercepts); they count as
    captured, their modules under that label."""
    watched = {id(m) for _, m in selected}
    watched_names = [name for name, _ in selected]
    captured_types: dict[str, int] = {}
    for _, module in selected:
        kind = layer_type(module)
        captured_types[kind] = captured_types.get(kind, 0) + 1
    extra: dict[int, str] = {}
    extra_modules: set[tuple[str, str]] = set()
    for name, kind, param in also_captured:
        if (name, kind) not in extra_modules:
            extra_modules.add((name, kind))
            captured_types[kind] = captured_types.get(kind, 0) + 1
        extra[id(param)] = kind

    def captured_by(key: object, holders: list) -> str | None:
        for _, module, local in holders:
            if id(module) in watched and (local == "weight" or (local == "bias" and cfg.bias)):
                return layer_type(module)
        return extra.get(key)

    total = matrix = got = got_matrix = 0
    type_parameters: dict[str, int] = {}
    groups: dict[tuple[str, str], list] = {}
    for key, (holders, shape, trainable) in _parameters(model).items():
        n, is_matrix = math.prod(shape), len(shape) >= 2
        total += n
        matrix += n if is_matrix else 0
        kind = captured_by(key, holders)
        if kind is not None:
            type_parameters[kind] = type_parameters.get(kind, 0) + n
            got += n
            got_matrix += n if is_matrix else 0
            continue
        name, module, local = holders[0]
        if id(module) in watched:
            reason = BIAS_OFF if local == "bias" else EXTRA
        else:
            reason = _why_not(name, module, local, trainable, cfg)
        entry = groups.setdefault((type(module).__name__, reason), [[], 0, 0])
        holder = name or local  # the model's own parameters are named as such
        if holder not in entry[0]:
            entry[0].append(holder)
        entry[1] += n
        entry[2] += n if is_matrix else 0
    uncovered = tuple(
        sorted(
            (
                UncoveredGroup(kind, reason, tuple(names), n, n_matrix, n / total if total else 0.0)
                for (kind, reason), (names, n, n_matrix) in groups.items()
            ),
            key=lambda g: (g.on_purpose, -g.parameters),
        )
    )
    return Coverage(
        captured_types,
        type_parameters,
        tuple(watched_names) + tuple(sorted({n for n, _ in extra_modules} - set(watched_names))),
        got,
        total,
        got_matrix,
        matrix,
        uncovered,
    )


def check_uncovered(coverage: Coverage, cfg: CaptureConfig) -> None:
    """With `capture.uncovered: error`, refuse a model whose matrix parameters are not all
    captured or explicitly left out, naming them and the fix."""
    missing = coverage.uncovered_matrices()
    if cfg.uncovered != "error" or not missing:
        return
    n = sum(g.matrix_parameters for g in missing)
    parts = [
        f"{g.type} {_names(g.modules)} ({g.matrix_parameters:,} parameters, {g.reason}: {g.fix()})"
        for g in missing[:6]
    ]
    raise CaptureError(
        f"capture.uncovered is 'error' and {n:,} matrix parameters "
        f"({n / coverage.total_parameters:.1%} of the model) are not captured: {'; '.join(parts)}. "
        "Add their type to capture.types or a pattern to capture.include, or list the modules in "
        "capture.exclude to leave them out on purpose (or set capture.uncovered: notice)"
    )


def _names(modules: tuple[str, ...], most: int = 3) -> str:
    shown = ", ".join(repr(m) for m in modules[:most])
    return f"[{shown}{', …' if len(modules) > most else ''}]"
