"""The files results are saved to: `.safetensors` (tensors + ids as JSON metadata), `.npz`
(arrays, ids as arrays), `.json` and `.csv` (for other tools); the suffix picks the format.

In every file the training examples' ids are `train_ids` and the queries' `query_ids`. Nothing
is pickled. A score matrix too large for memory is written block by block (`write_scores`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from logix import comm
from logix.store.format import write_atomic

RESULT_FORMAT = "logix-result"
SUFFIXES = (".safetensors", ".npz", ".json", ".csv")


def suffix_of(path: str | Path, allowed: tuple[str, ...] = SUFFIXES) -> str:
    """The format a file name asks for, or a ValueError naming the ones there are."""
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"cannot save a result to {path}: use a file name ending in {' / '.join(allowed)}")
    return suffix


def ids_array(ids: list) -> np.ndarray:
    """Ids as a numpy array: int64 when all are ints, else unicode strings."""
    if all(isinstance(i, int) for i in ids):
        return np.asarray(ids, dtype=np.int64).reshape(-1)
    return np.asarray([str(i) for i in ids], dtype=np.str_).reshape(-1)


def save_arrays(
    path: str | Path, kind: str, tensors: dict[str, torch.Tensor], ids: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """A result as .safetensors or .npz: `tensors`, the `ids` lists (a top-k's `train_ids` is a
    list of lists) and `meta`, all read back by `results.load_result`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix_of(path, (".safetensors", ".npz")) == ".safetensors":
        md = {
            "format": RESULT_FORMAT,
            "kind": kind,
            "meta": json.dumps(meta),
            **{k: json.dumps(v) for k, v in ids.items()},
        }
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=md)
        return path
    arrays = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    for k, v in ids.items():
        if kind == "top_k" and k == "train_ids":  # list of lists: a [n_query, k] array
            arrays[k] = np.stack([ids_array(r) for r in v]) if v else np.zeros((0, 0), np.int64)
        else:
            arrays[k] = ids_array(v)
    np.savez(path, kind=np.asarray(kind), meta=np.asarray(json.dumps(meta)), **arrays)
    return path


def save_json(path: str | Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8"))
    return path


def save_csv(path: str | Path, header: list[str], rows: Iterable[list]) -> Path:
    """One header line, then `rows`; floats written with 9 significant digits (float32 exact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(header)
            for row in rows:
                out.writerow([f"{v:.9g}" if isinstance(v, float) else v for v in row])

    write_atomic(path, write)
    return path


def load_json(path: Path) -> tuple[str, dict, dict[str, torch.Tensor], dict[str, Any]]:
    """(kind, meta, tensors, ids) of a result saved as .json."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        kind, meta = obj["kind"], dict(obj["meta"])
        if kind == "top_k":
            results = obj["results"]
            ids = {
                "query_ids": [r["query_id"] for r in results],
                "train_ids": [r["train_ids"] for r in results],
            }
            k = len(results[0]["scores"]) if results else 0
            tensors = {
                "values": torch.tensor([r["scores"] for r in results], dtype=torch.float32).reshape(-1, k),
                "indices": torch.tensor([r["indices"] for r in results], dtype=torch.int64).reshape(-1, k),
            }
        else:
            ids = {k: obj[k] for k in ("query_ids", "train_ids") if k in obj}
            tensors = {"values": torch.tensor(obj["values"], dtype=torch.float32)}
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path} is not a logix result file ({type(e).__name__}: {e})") from e
    return kind, meta, tensors, ids


def write_scores(path: str | Path, shape: tuple[int, ...], blocks: Iterable[torch.Tensor], like: Any) -> Path:
    """Write a score matrix of `shape` ([n_query, n_train] or [n_modules, n_query, n_train])
    to a .safetensors file as `Scores.save` does, from `blocks` of consecutive matrix rows
    ([b, n_train] float32, the leading dims flattened), so it is never whole in memory. Ids,
    mode and meta come from `like` (a `Scores`). The file appears complete or not at all."""
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
    path: str | Path, out: torch.Tensor, n_train: int, like: Any, distributed: bool, block_bytes: int
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
