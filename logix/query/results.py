"""Results of influence queries: score matrices, top-k lists, self-influence, with data ids.

Every result names the training examples' ids `.train_ids` and the queries' `.query_ids`;
prints as a short summary (shape, mode, a few ids); converts with `.to_numpy()` and
`.to_pandas()` (pandas optional); saves with `.save(path)` as .safetensors, .npz, .json or .csv
(`result_files.py`), read back by `logix.load_result`; and draws an HTML page with `.report(path)`
(`report.py`). A positive score means the training example helps the query.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logix.query.result_files import (  # noqa: F401  (save_columns, write_scores: the engine's)
    RESULT_FORMAT,
    load_json,
    save_arrays,
    save_columns,
    save_csv,
    save_json,
    suffix_of,
    write_scores,
)
from logix.store.ids import DataId
from logix.store.tagged import read_tagged


def few(ids: list, n: int = 3) -> str:
    """The first n ids and how many more: `[0, 1, 2, … 1394 more]`."""
    shown = ", ".join(repr(i) for i in ids[:n])
    return f"[{shown}{f', … {len(ids) - n} more' if len(ids) > n else ''}]"


def _describe(name: str, values: torch.Tensor, mode: str, meta: dict, ids: str) -> str:
    pre = f", preconditioner={meta['preconditioner']!r}" if meta.get("preconditioner") else ""
    dtype = str(values.dtype).removeprefix("torch.")
    return f"{name}(values {list(values.shape)} {dtype}, mode={mode!r}{pre}, {ids})"


def _no_data_ids(result: Any) -> Any:
    """`.data_ids` of a result: an error naming `.train_ids` (TopK's old name for them), never
    a fallback that quietly gives something else."""
    name = type(result).__name__
    raise AttributeError(f"{name} has no .data_ids: its training examples' ids are {name}.train_ids")


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as e:
        raise ImportError(
            "to_pandas() needs pandas: pip install pandas (or pip install 'logix[pandas]')"
        ) from e
    return pandas


@dataclass(repr=False)
class Scores:
    """values: [n_query, n_train] (or [n_modules, n_query, n_train] with `modules` set);
    values[..., i, j] is the score of train example train_ids[j] for query query_ids[i]."""

    values: torch.Tensor
    query_ids: list[DataId]
    train_ids: list[DataId]
    mode: str = "dot"
    modules: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    data_ids = property(lambda self: _no_data_ids(self))

    def __repr__(self) -> str:
        mods = f"modules={self.modules}, " if self.modules else ""
        ids = f"{mods}query_ids={few(self.query_ids)}, train_ids={few(self.train_ids)}"
        return _describe("Scores", self.values, self.mode, self.meta, ids)

    def to_numpy(self) -> np.ndarray:
        """values as a numpy array (same shape)."""
        return self.values.cpu().numpy()

    numpy = to_numpy

    def to_pandas(self) -> Any:
        """A DataFrame: one row per query (index `query_id`; with modules a (module, query_id)
        MultiIndex), one column per train id."""
        pd = _pandas()
        v = self.values.cpu().numpy()
        if self.modules is None:
            return pd.DataFrame(v, index=pd.Index(self.query_ids, name="query_id"), columns=self.train_ids)
        index = pd.MultiIndex.from_product([self.modules, self.query_ids], names=["module", "query_id"])
        return pd.DataFrame(v.reshape(-1, v.shape[-1]), index=index, columns=self.train_ids)

    def total(self) -> torch.Tensor:
        """[n_query, n_train]: the values, summed over modules when per module."""
        return self.values if self.modules is None else self.values.sum(0)

    def top_k(self, k: int = 10, harmful: bool = False) -> TopK:
        """Per query the k highest scores (harmful=True: the k lowest, most negative first), ties
        to the lower train index, as `InfluenceEngine.top_k` gives them."""
        total = self.total()
        k = max(0, min(int(k), total.shape[1]))
        order = torch.sort(-total if harmful else total, dim=1, descending=True, stable=True).indices[:, :k]
        ids = [[self.train_ids[j] for j in row] for row in order.tolist()]
        return TopK(total.gather(1, order), order, ids, list(self.query_ids), self.mode, dict(self.meta))

    def report(self, path: str | Path, k: int = 5, **options: Any) -> Path:
        """One self-contained HTML page: per query its k most helpful and k most harmful
        training examples (see `logix.query.report.write_report` for `options`: render, ...)."""
        from logix.query.report import write_report

        return write_report(path, self.top_k(k), self.top_k(k, harmful=True), **options)

    def save(self, path: str | Path) -> Path:
        """Write to .safetensors / .npz (read back by `logix.load_result`), .json or .csv (one line
        per query, `query_id` then one column per train id; per module a `module` column first)."""
        meta = {"mode": self.mode, "modules": self.modules, **self.meta}
        suffix = suffix_of(path)
        if suffix == ".json":
            ids = {"query_ids": self.query_ids, "train_ids": self.train_ids}
            return save_json(path, {"kind": "scores", "meta": meta, **ids, "values": self.values.tolist()})
        if suffix == ".csv":
            first = ["query_id"] if self.modules is None else ["module", "query_id"]
            names = [None] if self.modules is None else self.modules
            rows = (
                [*([] if m is None else [m]), q, *values]
                for m, block in zip(names, self.values.reshape(len(names), *self.values.shape[-2:]).tolist())
                for q, values in zip(self.query_ids, block)
            )
            return save_csv(path, [*first, *map(str, self.train_ids)], rows)
        ids = {"query_ids": self.query_ids, "train_ids": self.train_ids}
        return save_arrays(path, "scores", {"values": self.values}, ids, meta)


@dataclass(repr=False)
class TopK:
    """values / indices: [n_query, k], best first; train_ids[i][j] is the train id of row
    indices[i, j] of the store; positions [n_query, k, 2]: (start, stop) after re-ranking."""

    values: torch.Tensor
    indices: torch.Tensor
    train_ids: list[list[DataId]]
    query_ids: list[DataId]
    mode: str = "dot"
    meta: dict[str, Any] = field(default_factory=dict)
    positions: torch.Tensor | None = None  # [n_query, k, 2] (start, stop): see `query.rerank`

    data_ids = property(lambda self: _no_data_ids(self))

    def __repr__(self) -> str:
        first = self.train_ids[0] if self.train_ids else []
        ids = f"query_ids={few(self.query_ids)}, train_ids[0]={few(first)}"
        return _describe("TopK", self.values, self.mode, self.meta, ids)

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices) as numpy arrays, [n_query, k] each."""
        return self.values.cpu().numpy(), self.indices.cpu().numpy()

    numpy = to_numpy

    def rows(self) -> list[list]:
        """One list per (query, rank): query_id, rank (1 = best), train_id, index, score[, start, stop]."""
        out = []
        spans = None if self.positions is None else self.positions.tolist()
        for i, (q, ids, vals, idx) in enumerate(
            zip(self.query_ids, self.train_ids, self.values.tolist(), self.indices.tolist())
        ):
            for j, (tid, v, x) in enumerate(zip(ids, vals, idx)):
                out.append([q, j + 1, tid, x, v, *([] if spans is None else spans[i][j])])
        return out

    def columns(self) -> list[str]:
        return [
            "query_id",
            "rank",
            "train_id",
            "index",
            "score",
            *([] if self.positions is None else ["start", "stop"]),
        ]

    def to_pandas(self) -> Any:
        """A long DataFrame: one row per (query, rank), columns as `rows()`."""
        return _pandas().DataFrame(self.rows(), columns=self.columns())

    def report(self, path: str | Path, harmful: TopK | None = None, **options: Any) -> Path:
        """One self-contained HTML page of these training examples per query (and, given
        `harmful`, e.g. `scores.top_k(k, harmful=True)`, the most harmful ones beside them)."""
        from logix.query.report import write_report

        return write_report(path, self, harmful, **options)

    def save(self, path: str | Path) -> Path:
        """Write to .safetensors / .npz (read back by `logix.load_result`), .json or .csv (one line
        per (query, rank))."""
        meta = {"mode": self.mode, **self.meta}
        suffix = suffix_of(path)
        if suffix == ".csv":
            return save_csv(path, self.columns(), self.rows())
        if suffix == ".json":
            results = [
                {"query_id": q, "train_ids": ids, "scores": vals, "indices": idx}
                for q, ids, vals, idx in zip(
                    self.query_ids, self.train_ids, self.values.tolist(), self.indices.tolist()
                )
            ]
            return save_json(path, {"kind": "top_k", "meta": meta, "results": results})
        tensors = {"values": self.values, "indices": self.indices}
        if self.positions is not None:
            tensors["positions"] = self.positions
        return save_arrays(
            path, "top_k", tensors, {"query_ids": self.query_ids, "train_ids": self.train_ids}, meta
        )


@dataclass(repr=False)
class SelfInfluence:
    """values: [n_train] = I(z, z) (or [n_modules, n_train] with `modules` set)."""

    values: torch.Tensor
    train_ids: list[DataId]
    mode: str = "dot"
    modules: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    data_ids = property(lambda self: _no_data_ids(self))

    def __repr__(self) -> str:
        mods = f"modules={self.modules}, " if self.modules else ""
        return _describe(
            "SelfInfluence", self.values, self.mode, self.meta, f"{mods}train_ids={few(self.train_ids)}"
        )

    def to_numpy(self) -> np.ndarray:
        return self.values.cpu().numpy()

    numpy = to_numpy

    def total(self) -> torch.Tensor:
        """[n_train]: the values, summed over modules when per module."""
        return self.values if self.values.ndim == 1 else self.values.sum(0)

    def top(self, k: int = 10) -> list[tuple[DataId, float]]:
        """The k train examples of highest self-influence (outlier / mislabel candidates)."""
        total = self.total()
        order = torch.sort(total, descending=True, stable=True).indices[:k]
        return [(self.train_ids[i], float(total[i])) for i in order.tolist()]

    def rows(self) -> list[list]:
        """One list per train row: train_id, index, self_influence[, one value per module]."""
        per = [] if self.modules is None else self.values.T.tolist()
        return [
            [tid, j, v, *(per[j] if per else [])]
            for j, (tid, v) in enumerate(zip(self.train_ids, self.total().tolist()))
        ]

    def columns(self) -> list[str]:
        return ["train_id", "index", "self_influence", *(self.modules or [])]

    def to_pandas(self) -> Any:
        """A DataFrame: one row per train example, columns as `rows()`."""
        return _pandas().DataFrame(self.rows(), columns=self.columns())

    def save(self, path: str | Path) -> Path:
        """Write to .safetensors / .npz (read back by `logix.load_result`), .json or .csv."""
        meta = {"mode": self.mode, "modules": self.modules, **self.meta}
        suffix = suffix_of(path)
        if suffix == ".csv":
            return save_csv(path, self.columns(), self.rows())
        if suffix == ".json":
            obj = {
                "kind": "self_influence",
                "meta": meta,
                "train_ids": self.train_ids,
                "values": self.values.tolist(),
            }
            return save_json(path, obj)
        return save_arrays(
            path, "self_influence", {"values": self.values}, {"train_ids": self.train_ids}, meta
        )


def load_result(path: str | Path) -> Scores | TopK | SelfInfluence:
    """Read a result written by `.save(path)` as .safetensors, .npz or .json."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, md = read_tagged(path, RESULT_FORMAT, "a logix result file", error=ValueError)
        kind, meta = md["kind"], json.loads(md["meta"])
        ids = {k: json.loads(v) for k, v in md.items() if k.endswith("ids")}
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            kind, meta = str(z["kind"]), json.loads(str(z["meta"]))
            tensors = {k: torch.from_numpy(z[k]) for k in ("values", "indices", "positions") if k in z}
            ids = {k: z[k].tolist() for k in z.files if k.endswith("ids")}
    elif suffix == ".json":
        kind, meta, tensors, ids = load_json(path)
    else:
        raise ValueError(f"cannot load {path}: use a .safetensors, .npz or .json file")
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
