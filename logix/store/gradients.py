"""`Gradients`: projected per-example gradients held in memory, e.g. the query side of influence.

A query-mode run produces one; it can be saved to a safetensors file (values + JSON metadata,
never pickle) and handed to `logix query RUN_DIR --queries FILE`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from logix.errors import StoreError
from logix.store.format import ModuleInfo
from logix.store.ids import DataId
from logix.store.tagged import read_tagged


@dataclass(repr=False)
class Gradients:
    """Rows of projected gradients with their ids.

    values: [n, D] float32; data_ids: n caller ids; modules: the module table giving the column
    blocks of D; fingerprint: identifies the projections (a store only accepts its own).
    """

    values: torch.Tensor
    data_ids: list[DataId]
    modules: list[ModuleInfo]
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.ndim != 2:
            raise ValueError(f"values must be [n, D], got shape {tuple(self.values.shape)}")
        if len(self.data_ids) != self.values.shape[0]:
            raise ValueError(f"{len(self.data_ids)} data ids for {self.values.shape[0]} gradient rows")

    def __len__(self) -> int:
        return self.values.shape[0]

    def __repr__(self) -> str:
        """A summary (shape, modules, a few ids): printing never dumps every value."""
        ids = ", ".join(repr(i) for i in self.data_ids[:3])
        more = f", … {len(self.data_ids) - 3} more" if len(self.data_ids) > 3 else ""
        names = [m.name for m in self.modules]
        shown = names if len(names) <= 4 else [*names[:4], f"… {len(names) - 4} more"]
        return f"Gradients(values {list(self.values.shape)}, modules={shown}, data_ids=[{ids}{more}])"

    def module(self, name: str) -> torch.Tensor:
        """The block of one module, reshaped to [n, r_out, r_in]."""
        for m in self.modules:
            if m.name == name:
                return self.values[:, m.columns].reshape(-1, m.r_out, m.r_in)
        raise KeyError(f"no module {name!r}; modules are {[m.name for m in self.modules]}")

    def select(self, index: Sequence[int] | slice) -> Gradients:
        """A subset of the rows (same modules and fingerprint)."""
        if isinstance(index, slice):
            ids = self.data_ids[index]
        else:
            index = list(index)
            ids = [self.data_ids[i] for i in index]
        return Gradients(self.values[index], ids, self.modules, self.fingerprint, dict(self.meta))

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file: `values` plus ids, module table and fingerprint as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": "logix-gradients",
            "data_ids": json.dumps(list(self.data_ids)),
            "modules": json.dumps([m.to_dict() for m in self.modules]),
            "fingerprint": self.fingerprint,
            "meta": json.dumps(self.meta),
        }
        save_file(
            {"values": self.values.detach().to("cpu", torch.float32).contiguous()},
            str(path),
            metadata=metadata,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Gradients:
        path = Path(path)
        tensors, md = read_tagged(
            path,
            "logix-gradients",
            "a logix gradients file",
            "save one with `run.gradients().save(path)` from a query-mode run",
            keys=["values"],
        )
        try:
            return cls(
                values=tensors["values"].float(),
                data_ids=json.loads(md["data_ids"]),
                modules=[ModuleInfo.from_dict(d) for d in json.loads(md["modules"])],
                fingerprint=md["fingerprint"],
                meta=json.loads(md.get("meta", "{}")),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise StoreError(f"{path} has damaged metadata ({e!r}): save the gradients again") from None
