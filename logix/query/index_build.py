"""Building an approximate index from a store: one streaming pass, bounded memory, saved
crash-safely inside the run directory (`logix/store/ann.py`).

1. Sample: `sample_rows` rows read as 256 evenly spaced runs over the segment (a store is often
   in dataset order; its first rows are not a sample), at most `SAMPLE_BYTES` of float32.
2. Train the k-means quantizer (`nlist` cells) on the sample.
3. Add every row chunk by chunk from `store.iter_chunks` (row order, so faiss ids are row
   indices), normalised for the cosine metric; non-finite rows are an error, as in the engine.
   The same chunks give the exact neighbours of 256 sampled rows (held out of the training),
   from which nprobe is chosen for a measured recall (`index_calibrate.py`).
4. Save: faiss's own format (not pickle) under a temporary name, renamed to a name carrying its
   sha256, then the record (the commit point) replaced atomically.

Memory: the sample, one chunk, and the index itself (IVF-Flat keeps every row: 4·N·D bytes).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from logix.errors import StoreError
from logix.notices import warn
from logix.progress import ProgressFn
from logix.query.index import ApproximateIndex, faiss_module
from logix.query.index_calibrate import (
    CALIBRATION_K,
    CALIBRATION_QUERIES,
    ExactNeighbours,
    calibrated_nprobe,
    recall_at,
)
from logix.query.transfer import DEFAULT_CHUNK_BYTES, rows_per_chunk
from logix.store.ann import ann_dir, content_key, file_sha256, write_record
from logix.store.format import fsync_dir
from logix.store.reader import Store, open_store
from logix.store.row_reader import RowReader
from logix.vocabulary import INDEX_METRICS, check_choice

SAMPLE_BYTES = 512 << 20  # float32 bytes of the training sample at most
SAMPLE_RUNS = 256  # contiguous runs the sample is read in, spread evenly over the segment


def default_nlist(rows: int) -> int:
    """Cells of the quantizer: about 4·√N, and at most N/39 (faiss wants ≥ 39 rows per cell)."""
    return max(1, min(int(round(4 * math.sqrt(rows))), rows // 39))


def build_index(
    store: Store | str | os.PathLike,
    metric: str = "cosine",
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    recall: float = 0.95,
    sample_rows: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    seed: int = 0,
    save: bool = True,
    progress: ProgressFn | None = None,
) -> ApproximateIndex:
    """Build the `metric` ("cosine" | "dot") IVF-Flat index of a store's segment and save it in
    the run directory (replacing an older one of that metric), unless save=False.

    nlist: k-means cells (default about 4·√N); nprobe: the cells a query scans by default
    (recorded, overridable per `open_index`); default: the fewest cells whose measured recall
    of 256 sampled rows' exact top 100 (each row's own left out), less two standard errors,
    reaches `recall`; the recall at
    the recorded nprobe is in `record["calibration"]` either way; sample_rows: the quantizer's
    training rows (default min(N, 64·nlist), capped at 512 MiB of float32); progress: optional
    `fn(phase, done, total)` with phases "sample", "train", "index", "save". A directory that
    cannot be written keeps the index in memory, with a warning."""
    faiss = faiss_module()
    if not isinstance(store, Store):
        store = open_store(Path(store))
    check_choice(metric, INDEX_METRICS, "index metric")
    n, width = len(store), store.width
    if n == 0:
        raise StoreError(f"store {store.path}, segment {store.segment!r} has no rows to index")
    nlist = default_nlist(n) if nlist is None else int(nlist)
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist must be between 1 and the store's {n} rows, got {nlist}")
    if nprobe is not None and int(nprobe) < 1:
        raise ValueError(f"nprobe must be at least 1 cell, got {nprobe}")
    if not 0.0 < float(recall) <= 1.0:
        raise ValueError(f"recall must be a target share in (0, 1], got {recall}")
    if sample_rows is None:
        sample_rows = min(n, max(39 * nlist, min(64 * nlist, SAMPLE_BYTES // (4 * width))))
    sample_rows = min(n, int(sample_rows))
    if sample_rows < nlist:
        raise ValueError(f"sample_rows ({sample_rows}) must be at least nlist ({nlist})")
    report = progress or (lambda phase, done, total: None)
    started = time.perf_counter()

    sample, sample_index = _sample(store, sample_rows, report)
    if metric == "cosine":
        _normalise(sample)
    # Calibration queries: sampled rows held out of the quantizer's training (a row the cells
    # were fitted to sits better in its cell than an unseen query: recall would be overstated).
    count = min(CALIBRATION_QUERIES, max(1, sample_rows // 8))
    picks = torch.linspace(0, sample_rows - 1, count).long().unique()
    exact = ExactNeighbours(sample[picks].clone(), sample_index[picks], min(CALIBRATION_K, n - 1))
    if sample_rows - len(picks) >= 39 * nlist:  # else too few rows to fit the cells without them
        keep = torch.ones(sample_rows, dtype=torch.bool)
        keep[picks] = False
        sample = sample[keep]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    report("train", 0, 1)
    index.train(sample.numpy())
    report("train", 1, 1)
    del sample

    done = 0
    for _, x in store.iter_chunks(rows_per_chunk(chunk_bytes, width), buffers=2):
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x).all(dim=1)).nonzero()[0])
            raise StoreError(
                f"row {done + bad} of {store.path} holds NaN/inf: the index cannot hold it; check "
                f"the store with `logix inspect {store.path}`"
            )
        chunk = x.clone() if metric == "cosine" else x
        if metric == "cosine":
            _normalise(chunk)
        index.add(chunk.numpy())
        exact.add(chunk, done)
        done += x.shape[0]
        report("index", done, n)

    if exact.k < 1:  # a one-row store: the one cell holds it
        nprobe, measured = int(nprobe or 1), (1.0, 1.0)
    elif nprobe is None:
        nprobe, measured = calibrated_nprobe(index, exact, nlist, float(recall))
    else:
        nprobe, measured = int(nprobe), recall_at(index, exact, int(nprobe))
    record = {
        "metric": metric,
        "kind": "ivf-flat",
        "nlist": nlist,
        "nprobe": nprobe,
        "rows": n,
        "width": width,
        "sample_rows": sample_rows,
        "calibration": {
            "queries": len(picks),
            "k": exact.k,
            "target": float(recall),
            "recall": round(measured[0], 4),
            "recall_lower": round(measured[1], 4),  # less two standard errors over the queries
            "nprobe": nprobe,
        },
        "content_key": content_key(store),
        "segment": store.segment,
        "fingerprint": store.fingerprint,
        "seconds": round(time.perf_counter() - started, 3),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if save:
        report("save", 0, 1)
        try:
            record = _save(store, index, record)
        except OSError as e:
            warn(
                f"logix: the index of {store.path} could not be saved ({e}); it is kept in memory "
                "for this process only"
            )
        report("save", 1, 1)
    return ApproximateIndex(index, record, nprobe)


def _sample(store: Store, rows: int, report: ProgressFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(`rows` rows [rows, D] float32 read as up to SAMPLE_RUNS contiguous runs at evenly spaced
    starts over the segment (all rows when rows = N), their row indices [rows])."""
    n = len(store)
    runs = min(SAMPLE_RUNS, rows)
    sizes = [rows // runs + (1 if r < rows % runs else 0) for r in range(runs)]
    out = torch.empty((rows, store.width), dtype=torch.float32)
    where = torch.empty(rows, dtype=torch.long)
    reader, pos = RowReader(store), 0
    try:
        for r, size in enumerate(sizes):
            start = min(n - size, (r * n) // runs)
            reader.read_into(out[pos : pos + size], start)
            where[pos : pos + size] = torch.arange(start, start + size)
            pos += size
            report("sample", pos, rows)
    finally:
        reader.close()
    if not bool(torch.isfinite(out).all()):
        raise StoreError(
            f"{store.path} holds NaN/inf rows: the index cannot hold them; check the store with "
            f"`logix inspect {store.path}`"
        )
    return out, where


def _normalise(x: torch.Tensor) -> None:
    """Divide each row by its norm in place (rows of norm 0 stay 0: they score 0, as exactly)."""
    norms = x.norm(dim=1, keepdim=True)
    x.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))


def _save(store: Store, index: Any, record: dict) -> dict:
    """Write the faiss file (temporary name, fsync, rename to <metric>-<sha16>.faiss), then
    commit the record; returns the record with file, bytes and sha256."""
    faiss = faiss_module()
    folder = ann_dir(store.path, store.segment)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_orphans(folder, record["metric"])
    tmp = folder / f".{record['metric']}.faiss.tmp-{os.getpid()}"
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        sha = file_sha256(tmp)
        name = f"{record['metric']}-{sha[:16]}.faiss"
        size = tmp.stat().st_size
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    record = {**record, "file": name, "bytes": size, "sha256": sha}
    write_record(store.path, store.segment, record["metric"], record)
    return record


def _remove_orphans(folder: Path, metric: str) -> None:
    """Delete temporary index files left by builds that were killed (their process is gone)."""
    for tmp in folder.glob(f".{metric}.faiss.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            continue
