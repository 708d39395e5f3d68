"""Tied weights: one Parameter used by several modules (an output head sharing the embedding
matrix, as Hugging Face ties `lm_head` to the input embeddings; encoder and decoder embeddings
sharing one table).

The store keeps one column block per parameter, not one per module: the first Embedding among
the modules sharing it (else the first of them) owns the entry, and every other use adds its
per-example gradient into the same block, so the block holds the gradient of all uses summed,
cross terms included. A module of the owner's kind adds its (x̃, g̃) as its own hooks would
(`orientation` "same"); an nn.Linear using an Embedding's table [vocab, dim] as its weight
computes y = W h, whose gradient g hᵀ is the transpose of the entry's [dim, vocab] layout
("transposed": the forward side h is projected by P_out and the output gradient by P_in,
`functional_uses.py`); an nn.Embedding reading a watched Linear's weight ("lookup", when only
the head is watched) adds (P_out e_idx)(P_in g)ᵀ.
"""

from __future__ import annotations

from torch import nn

from logix.capture.per_sample import layer_type
from logix.capture.wrappers import named_modules
from logix.errors import CaptureError
from logix.notices import warn


def orientation(owner_name: str, owner, sharer_name: str, sharer) -> str:
    """How `sharer`'s use of `owner`'s weight maps into the owner's block: "same" or
    "transposed"; a clear CaptureError for a pair logix cannot add up exactly."""
    a, b = layer_type(owner), layer_type(sharer)
    if a == b == "Embedding":
        return "same"
    if a == b == "Linear" and owner.bias is sharer.bias:
        return "same"
    if a == "Embedding" and b == "Linear":
        if sharer.bias is not None and not getattr(sharer, "_logix_tied_bias_noticed", False):
            sharer._logix_tied_bias_noticed = True
            warn(
                f"{sharer_name!r} shares its weight with {owner_name!r} (captured with it); its own "
                f"bias ({sharer.bias.numel()} parameters) is not captured"
            )
        return "transposed"
    if a == "Linear" and b == "Embedding" and type(sharer).forward is nn.Embedding.forward:
        return "lookup"  # an Embedding reading a watched head's weight: linear_uses.record_lookup
    raise CaptureError(
        f"{sharer_name!r} ({b}) shares its weight with {owner_name!r} ({a}), a pairing logix "
        "cannot add up exactly (it captures an Embedding shared with Embeddings or Linear heads, "
        "and Linears sharing weight and bias); add one of them to capture.exclude and untie the "
        "weights, or watch the Embedding"
    )


def drop_tied(chosen: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """The selected entries with one entry per weight Parameter: of the modules sharing a
    weight the first Embedding (else the first) stays; the others are captured into its block
    (`tied_sharers`)."""
    groups: dict[int, list[int]] = {}
    for i, (_, module) in enumerate(chosen):
        groups.setdefault(id(module.weight), []).append(i)
    dropped: set[int] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        embeddings = [i for i in members if layer_type(chosen[i][1]) == "Embedding"]
        owner = embeddings[0] if embeddings else members[0]
        for i in members:
            if i != owner:
                orientation(*chosen[owner], *chosen[i])
                dropped.add(i)
    return [item for i, item in enumerate(chosen) if i not in dropped]


def tied_sharers(
    model: nn.Module, entries: list[tuple[str, object]]
) -> list[tuple[str, nn.Module, int, str]]:
    """Every module of the model (watched or not) whose weight is a watched entry's weight but
    which is not that entry's module: (name, module, index of the entry, orientation)."""
    owners = {id(module.weight): i for i, (_, module) in enumerate(entries)}
    own = {id(module) for _, module in entries}
    found = []
    for name, module in named_modules(model):
        weight = getattr(module, "weight", None)
        if id(module) in own or weight is None or id(weight) not in owners or layer_type(module) is None:
            continue
        i = owners[id(weight)]
        found.append((name, module, i, orientation(*entries[i], name, module)))
    return found
