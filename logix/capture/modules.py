"""Which modules of a model are watched, and the store's module table for them: dims, ranks
(clamped to each side's width) and column offsets in a row of width D."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from torch import nn

from logix.capture.attention import with_attention_projections
from logix.capture.experts import notice_stacked_parameters
from logix.capture.per_sample import has_bias, layer_dims, layer_type
from logix.capture.tied import drop_tied
from logix.capture.wrappers import named_modules, unwrap_model
from logix.config import CaptureConfig, LogixConfig
from logix.errors import CaptureError, StoreError
from logix.store.format import ModuleInfo


def select_modules(model: nn.Module, cfg: CaptureConfig) -> list[tuple[str, nn.Module]]:
    """Watched modules in `model.named_modules()` order: type in cfg.types, name matching an
    `include` pattern and no `exclude` pattern (fnmatch, e.g. 'encoder.*.fc1'). Names are those
    of the unwrapped model (no DDP 'module.' or FSDP '_fsdp_wrapped_module.' parts)."""
    chosen = []
    for name, module in with_attention_projections(named_modules(model)):
        kind = layer_type(module)
        if kind is None or kind.split(".")[0] not in cfg.types or not name:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            continue
        chosen.append((name, module))
    chosen = drop_tied(chosen)  # a weight shared by several modules gets one entry (tied.py)
    notice_stacked_parameters(model)  # fused experts: not captured, said out loud (experts.py)
    if not chosen:
        root = unwrap_model(model)
        if layer_type(root) is not None:
            raise CaptureError(
                f"the model is itself a {layer_type(root)} layer, and logix watches the layers "
                "inside a model (by their names in model.named_modules(); the model's own name "
                "is ''): wrap it, e.g. model = nn.Sequential(layer), whose layer is then "
                "watched as '0'"
            )
        candidates = [n for n, m in named_modules(model) if n and layer_type(m)]
        raise CaptureError(
            f"no module of {type(model).__name__} matches capture.types={cfg.types}, "
            f"include={cfg.include}, exclude={cfg.exclude}; candidate modules: "
            f"{candidates[:20] or 'none (logix captures Linear, Conv1D, Conv1d, Conv2d, Embedding)'}"
        )
    return chosen


def module_table(selected: list[tuple[str, nn.Module]], config: LogixConfig) -> list[ModuleInfo]:
    """The store's module table for the watched layers: dims, ranks (clamped to each side's
    width) and column offsets in the row of width D."""
    table, offset = [], 0
    for name, module in selected:
        d_in, d_out = layer_dims(module, config.capture.bias)
        if config.projection.kind == "identity":
            r_in, r_out = d_in, d_out
        else:
            r_in, r_out = min(config.projection.rank_in, d_in), min(config.projection.rank_out, d_out)
        info = ModuleInfo(
            name, layer_type(module), d_in, d_out, r_in, r_out, has_bias(module, config.capture.bias), offset
        )
        table.append(info)
        offset += info.width
    return table


def check_model(manifest: dict, modules: list[ModuleInfo], run_dir: Path) -> None:
    """The model must have exactly the modules (and shapes) the store was logged with."""
    stored = [ModuleInfo.from_dict(d) for d in manifest["modules"]]
    if stored == modules:
        return
    have = {m.name: m for m in modules}
    want = {m.name: m for m in stored}
    problems = [f"missing module {n!r}" for n in want if n not in have]
    problems += [f"extra module {n!r}" for n in have if n not in want]
    for n in want.keys() & have.keys():
        a, b = want[n], have[n]
        for key in ("type", "d_in", "d_out", "r_in", "r_out", "bias"):
            if getattr(a, key) != getattr(b, key):
                problems.append(
                    f"{n}.{key} is {getattr(a, key)} in the store, {getattr(b, key)} in the model"
                )
    if not problems:
        problems.append("modules are in a different order")
    raise StoreError(
        f"the model does not match the store at {run_dir}: "
        + "; ".join(problems[:6])
        + ". Use the model the store was logged with (same architecture and capture config)."
    )
