"""Results of influence queries: score matrices, top-k lists, self-influence, with data ids.

Each result saves to `.safetensors` (tensors + ids as JSON metadata), `.npz` (arrays; ids as
arrays) or, for top-k and self-influence, `.json`; the suffix picks the format. In every file
the training examples' ids are `train_ids` and the queries' `query_ids` (a top-k's `train_ids`
is [n_query, k], its `.data_ids` attribute). `load_result`
reads the first two back. Nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from logix import comm
from logix.store.format import write_atomic
from logix.store.tagged import read_tagged

DataId = int | str
RESULT_FORMAT = "logix-result"


def _ids_array(ids: list) -> np.ndarray:
    """Ids as a numpy array: int64 when all are ints, else unicode strings."""
    if all(isinstance(i, int) for i in ids):
        return np.asarray(ids, dtype=np.int64).reshape(-1)
    return np.asarray([str(i) for i in ids], dtype=np.str_).reshape(-1)


def _save(
    path: str | Path, kind: str, tensors: dict[str, torch.Tensor], ids: dict[str, Any], meta: dict[str, Any]
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        md = {
            "format": RESULT_FORMAT,
            "kind": kind,
            "meta": json.dumps(meta),
            **{k: json.dumps(v) for k, v in ids.items()},
        }
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=md)
    elif suffix == ".npz":
        arrays = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
        for k, v in ids.items():
            if kind == "top_k" and k == "train_ids":  # list of lists: a [n_query, k] array
                arrays[k] = np.stack([_ids_array(r) for r in v]) if v else np.zeros((0, 0), np.int64)
            else:
                arrays[k] = _ids_array(v)
        np.savez(path, kind=np.asarray(kind), meta=np.asarray(json.dumps(meta)), **arrays)
    else:
        raise ValueError(f"cannot save to {path}: use a .safetensors or .npz file name")
    return path


@dataclass
class Scores:
    """values: [n_query, n_train] (or [n_modules, n_query, n_train] with `modules` set)."""

    values: torch.Tensor
    query_ids: list[DataId]
    train_ids: list[DataId]
    mode: str = "dot"
    modules: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def numpy(self) -> np.ndarray:
        return self.values.cpu().numpy()

    def save(self, path: str | Path) -> Path:
        return _save(
            path,
            "scores",
            {"values": self.values},
            {"query_ids": self.query_ids, "train_ids": self.train_ids},
            {"mode": self.mode, "modules": self.modules, **self.meta},
        )


@dataclass
class TopK:
    """values / indices: [n_query, k], best first; data_ids[i][j] is train id of indices[i, j]."""

    values: torch.Tensor
    indices: torch.Tensor
    data_ids: list[list[DataId]]
    query_ids: list[DataId]
    mode: str = "dot"
    meta: dict[str, Any] = field(default_factory=dict)
    positions: torch.Tensor | None = None  # [n_query, k, 2] (start, stop): see `query.rerank`

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices) as numpy arrays."""
        return self.values.cpu().numpy(), self.indices.cpu().numpy()

    def save(self, path: str | Path) -> Path:
        meta = {"mode": self.mode, **self.meta}
        if Path(path).suffix.lower() == ".json":
            return _save_json(
                path,
                {
                    "kind": "top_k",
                    "meta": meta,
                    "results": [
                        {"query_id": q, "train_ids": ids, "scores": vals, "indices": idx}
                        for q, ids, vals, idx in zip(
                            self.query_ids, self.data_ids, self.values.tolist(), self.indices.tolist()
                        )
                    ],
                },
            )
        tensors = {"values": self.values, "indices": self.indices}
        if self.positions is not None:
            tensors["positions"] = self.positions
        return _save(path, "top_k", tensors, {"query_ids": self.query_ids, "train_ids": self.data_ids}, meta)


@dataclass
class SelfInfluence:
    """values: [n_train] = I(z, z) (or [n_modules, n_train] with `modules` set)."""

    values: torch.Tensor
    train_ids: list[DataId]
    mode: str = "dot"
    modules: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def numpy(self) -> np.ndarray:
        return self.values.cpu().numpy()

    def top(self, k: int = 10) -> list[tuple[DataId, float]]:
        """The k train examples of highest self-influence (outlier / mislabel candidates)."""
        total = self.values if self.values.ndim == 1 else self.values.sum(0)
        order = torch.sort(total, descending=True, stable=True).indices[:k]
        return [(self.train_ids[i], float(total[i])) for i in order.tolist()]

    def save(self, path: str | Path) -> Path:
        meta = {"mode": self.mode, "modules": self.modules, **self.meta}
        if Path(path).suffix.lower() == ".json":
            return _save_json(
                path,
                {
                    "kind": "self_influence",
                    "meta": meta,
                    "train_ids": self.train_ids,
                    "values": self.values.tolist(),
                },
            )
        return _save(path, "self_influence", {"values": self.values}, {"train_ids": self.train_ids}, meta)


def write_scores(
    path: str | Path, shape: tuple[int, ...], blocks: Iterable[torch.Tensor], like: Scores
) -> Path:
    """Write a score matrix of `shape` ([n_query, n_train] or [n_modules, n_query, n_train])
    to a .safetensors file as `Scores.save` does, from `blocks` of consecutive matrix rows
    ([b, n_train] float32, the leading dims flattened), so it is never whole in memory. Ids,
    mode and meta come from `like`. The file appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_train = shape[-1]
    total = 1
    for d in shape:
        total *= int(d)
    meta = {"mode": like.mode, "modules": like.modules, **like.meta}
    md = {
        "format": RESULT_FORMAT,
        "kind": "scores",
        "meta": json.dumps(meta),
        "query_ids": json.dumps(like.query_ids),
        "train_ids": json.dumps(like.train_ids),
    }
    header = {
        "__metadata__": md,
        "values": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 4 * total]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(tmp: Path) -> None:
        written = 0
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for block in blocks:
                block = block.detach().to("cpu", torch.float32).contiguous()
                if block.ndim != 2 or block.shape[1] != n_train:
                    raise ValueError(f"score block of shape {tuple(block.shape)}; expected [rows, {n_train}]")
                f.write(memoryview(block.numpy()).cast("B"))
                written += block.numel()
        if written != total:
            raise ValueError(f"the score blocks hold {written} values; the matrix {list(shape)} has {total}")

    write_atomic(path, write)
    return path


def save_columns(
    path: str | Path, out: torch.Tensor, n_train: int, like: Scores, distributed: bool, block_bytes: int
) -> Path:
    """Write a score matrix whose last dim this process holds a column block of (`out`
    [..., n_local]; all of it in one process) as `write_scores` does: rank 0 gathers and
    writes about `block_bytes` of matrix rows at a time, the other ranks send theirs."""
    rows = out.reshape(-1, out.shape[-1])  # [(n_modules ·) n_query, n_local]
    step = max(1, int(block_bytes) // (4 * n_train))
    blocks = (
        (comm.gather_columns_to(rows[b : b + step]) if distributed else rows[b : b + step])
        for b in range(0, rows.shape[0], step)
    )
    shape = (*out.shape[:-1], n_train)

    def write() -> None:
        try:
            write_scores(path, shape, blocks, like)
        finally:
            for _ in blocks:  # other ranks wait in the gather until every block is taken
                pass

    if comm.rank_and_world()[0] == 0 or not distributed:
        comm.together(write)
    else:
        comm.together(lambda: [None for _ in blocks])
    return Path(path)


def _save_json(path: str | Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    return path


def load_result(path: str | Path) -> Scores | TopK | SelfInfluence:
    """Read a result written by `.save(path)` as .safetensors or .npz."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        tensors, md = read_tagged(path, RESULT_FORMAT, "a logix result file", error=ValueError)
        kind, meta = md["kind"], json.loads(md["meta"])
        ids = {k: json.loads(v) for k, v in md.items() if k.endswith("ids")}
    elif path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            kind, meta = str(z["kind"]), json.loads(str(z["meta"]))
            tensors = {k: torch.from_numpy(z[k]) for k in ("values", "indices", "positions") if k in z}
            ids = {k: z[k].tolist() for k in z.files if k.endswith("ids")}
    else:
        raise ValueError(f"cannot load {path}: use a .safetensors or .npz file")
    mode = meta.pop("mode", "dot")
    if kind == "scores":
        return Scores(
            tensors["values"], ids["query_ids"], ids["train_ids"], mode, meta.pop("modules", None), meta
        )
    if kind == "top_k":
        # Older top-k files named their train ids `data_ids`; read both.
        train = ids["train_ids"] if "train_ids" in ids else ids["data_ids"]
        return TopK(
            tensors["values"],
            tensors["indices"],
            train,
            ids["query_ids"],
            mode,
            meta,
            tensors.get("positions"),
        )
    return SelfInfluence(tensors["values"], ids["train_ids"], mode, meta.pop("modules", None), meta)
