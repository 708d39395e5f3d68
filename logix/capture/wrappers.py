"""Module names as the user's model has them, whatever wraps it (DDP, DataParallel, FSDP v1,
activation checkpointing): a store's module table never depends on the wrapper."""

from __future__ import annotations

from torch import nn

# Path components that model wrappers insert into `named_modules()` names: FSDP (v1) and
# activation checkpointing wrap a submodule and expose it under these attribute names.
WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel / DataParallel / FSDP (v1) wrapper holds; `model`
    itself when it is not wrapped (FSDP v2's `fully_shard` does not rename modules)."""
    wrappers: tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def canonical_name(name: str) -> str:
    """A module name without the components wrappers insert: 'a._fsdp_wrapped_module.fc1'
    becomes 'a.fc1', so a store's module table does not depend on how the model was wrapped."""
    if not any(w in name for w in WRAPPER_COMPONENTS):
        return name
    return ".".join(p for p in name.split(".") if p not in WRAPPER_COMPONENTS)


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`model.named_modules()` of the unwrapped model under canonical names, wrapper modules
    (whose canonical name repeats their child's) left out."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    items = list(unwrap_model(model).named_modules())
    for raw, module in reversed(items):  # innermost first: the wrapped module keeps the name
        name = canonical_name(raw)
        if name in seen:
            continue
        seen.add(name)
        out.append((name, module))
    return out[::-1]
