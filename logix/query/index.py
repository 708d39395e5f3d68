"""An approximate (FAISS) index of a store's rows: top-k without scanning the whole store.

Which engines it answers. Under the `identity` preconditioner the score of a train row x for a
query q is ⟨q, x⟩ (mode "dot"), ⟨q, x⟩/(‖q‖‖x‖) ("cosine") or ⟨q, x⟩/‖x‖ ("relative"): a
maximum-inner-product search, over the rows as stored (metric "dot") or over the rows divided
by their norms (metric "cosine", which serves "cosine" and "relative": for one query both rank
the rows by ⟨q, x/‖x‖⟩, relative's values are ‖q‖ times cosine's). This is the retrieval
configuration (configs/retrieval.yaml): kfac-whitened projections put the curvature into the
rows, so identity-preconditioned cosine is K-FAC influence.

Why not raw / kfac / ekfac. Their score is ⟨Wq, Wx⟩ with W = (F + λI)^{-1/2}; an index of the
whitened rows Wx would answer it exactly in ranking terms too, but it would be tied to the
statistics, the damping and (for cosine) the norms in that metric: every new damping a new
index of the whole store. logix refuses those engines (`ConfigError` naming the fix: a
kfac-whitened store with the identity preconditioner, or the exact scan) rather than keep such
indexes; likewise a module subset (the index holds whole rows) and distributed engines (one
process searches the index).

The index is IVF-Flat with inner products (faiss `IndexIVFFlat`): `nlist` k-means cells trained
on a sample of rows, each row stored whole in its nearest cell; a query scans the `nprobe`
cells nearest to it. Its scores are exact inner products of the stored float32 rows, so only
rows outside the probed cells can be missed (nprobe = nlist is an exhaustive search). It holds
the rows in float32 (memory ≈ 4·N·D bytes: the store's size at float32). Files, keys and
checksums: `logix/store/ann.py`; building: `index_build.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from logix.errors import ConfigError, StoreError
from logix.store.ann import checked_file, content_key, read_record, rebuild_fix
from logix.store.reader import Store
from logix.vocabulary import INDEX_METRICS, check_choice

EXTRA_FIX = 'pip install "logix[index]" (faiss-cpu; faiss-gpu where CUDA is present)'


def faiss_module() -> Any:
    """faiss, imported on first use; an ImportError naming the extra when it is missing."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"approximate indexes need faiss: {EXTRA_FIX}") from e
    return faiss


def metric_for(mode: str) -> str:
    """The index metric that answers a score mode: "dot" for dot, "cosine" for cosine and
    relative (one ranking: ⟨q, x/‖x‖⟩)."""
    return "dot" if mode == "dot" else "cosine"


@dataclass
class ApproximateIndex:
    """A built index of one store segment (`build_index` or `open_index`).

    faiss_index: the faiss `IndexIVFFlat` (rows added in store row order: faiss id = row index);
    record: what the build wrote (metric, nlist, rows, content_key, file, sha256, ...); nprobe:
    cells scanned per query (more: higher recall, slower; nprobe = nlist is exhaustive)."""

    faiss_index: Any
    record: dict
    nprobe: int
    _gpu: Any = field(default=None, repr=False)

    @property
    def metric(self) -> str:
        return self.record["metric"]

    @property
    def nlist(self) -> int:
        return int(self.record["nlist"])

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def describe(self) -> dict[str, Any]:
        """What a result's meta says about the index that answered it."""
        return {
            "kind": self.record["kind"],
            "metric": self.metric,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
        }

    def check_store(self, store: Store) -> None:
        """Raise a StoreError naming the rebuild when `store` is not the content this index
        was built from (rows logged or re-logged since, other projections, another segment)."""
        if self.record["content_key"] != content_key(store) or len(self) != len(store):
            raise StoreError(
                f"the {self.metric} index of {store.path}, segment {store.segment!r}, was built "
                f"from other rows ({self.record['rows']} rows then, {len(store)} now; the shards, "
                f"their checksums or the projections differ): it is stale. {rebuild_fix(store.path)}"
            )

    def search(self, queries: np.ndarray, k: int, device: torch.device | None = None) -> tuple:
        """(scores float32 [n, k], row indices int64 [n, k]) of each query row's k best
        inner products with the indexed rows; queries [n, D] float32 prepared for the metric
        (unit rows for "cosine"). Queries whose probed cells hold fewer than k rows are searched
        again with twice the cells until they are filled (at most nlist: exhaustive)."""
        index = self._searcher(device)
        nprobe = min(self.nprobe, self.nlist)
        values, rows = self._probe(index, queries, k, nprobe)
        short = np.nonzero((rows < 0).any(axis=1))[0]
        while len(short) and nprobe < self.nlist:
            nprobe = min(self.nlist, 2 * nprobe)
            values[short], rows[short] = self._probe(index, queries[short], k, nprobe)
            short = short[(rows[short] < 0).any(axis=1)]
        if len(short):  # cannot happen with k ≤ rows: every row is in some cell
            raise StoreError(f"the index returned fewer than {k} rows; {rebuild_fix('RUN_DIR')}")
        return values, rows

    def _probe(self, index: Any, queries: np.ndarray, k: int, nprobe: int) -> tuple:
        index.nprobe = int(nprobe)  # IndexIVFFlat and GpuIndexIVFFlat alike
        values, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), int(k))
        return values, rows

    def _searcher(self, device: torch.device | None) -> Any:
        """The faiss index to search: a GPU copy when the engine is on CUDA and faiss has GPUs."""
        faiss = faiss_module()
        if device is None or device.type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
            return self.faiss_index
        if faiss.get_num_gpus() < 1:
            return self.faiss_index
        if self._gpu is None:
            resources = faiss.StandardGpuResources()
            self._gpu = (resources, faiss.index_cpu_to_gpu(resources, device.index or 0, self.faiss_index))
        return self._gpu[1]


def open_index(store: Store | Any, metric: str = "cosine", nprobe: int | None = None) -> ApproximateIndex:
    """The saved `metric` index of `store` (a Store or a run directory), after checking its
    record against the store's current content and its file's size and sha256 against the
    record: a missing, stale or damaged index is a StoreError naming the rebuild."""
    from logix.store.reader import open_store

    if not isinstance(store, Store):
        store = open_store(store)
    check_choice(metric, INDEX_METRICS, "index metric")
    record = read_record(store.path, store.segment, metric)
    if record is None:
        raise StoreError(
            f"{store.path}, segment {store.segment!r}, has no {metric} index: build it with "
            f"`logix index {store.path} --build` (or logix.build_index(store)), or query exactly (index=None)"
        )
    if record.get("metric") != metric or record.get("content_key") != content_key(store):
        raise StoreError(
            f"the {metric} index of {store.path}, segment {store.segment!r}, was built from "
            f"other rows ({record.get('rows')} rows then, {len(store)} now; the shards, their "
            f"checksums or the projections differ): it is stale. {rebuild_fix(store.path)}"
        )
    path = checked_file(store.path, store.segment, record)
    faiss = faiss_module()
    try:
        loaded = faiss.read_index(str(path))
    except RuntimeError as e:
        raise StoreError(f"faiss cannot read {path} ({e}); {rebuild_fix(store.path)}") from e
    if (
        loaded.ntotal != len(store)
        or loaded.d != store.width
        or loaded.metric_type != faiss.METRIC_INNER_PRODUCT
    ):
        raise StoreError(f"the index file {path} does not describe this store; {rebuild_fix(store.path)}")
    chosen = int(record["nprobe"]) if nprobe is None else int(nprobe)
    if chosen < 1:
        raise ValueError(f"nprobe must be at least 1 cell, got {nprobe}")
    return ApproximateIndex(loaded, record, chosen)


def check_engine(engine: Any, index: ApproximateIndex | None, mode: str | None = None) -> None:
    """Raise a ConfigError naming the fix unless `engine` (and `mode`, when given) is a
    configuration that `index` answers exactly in ranking terms (see the module doc)."""
    kind = engine.preconditioner.kind
    if kind != "identity":
        raise ConfigError(
            f"an approximate index answers the identity preconditioner only, this engine uses "
            f"{kind!r} (its scores ⟨Wq, Wx⟩ with W = (F+λI)^(-1/2) would need an index of whitened "
            "rows for each damping): use preconditioner='identity' on a kfac-whitened store "
            "(configs/retrieval.yaml), or query exactly (index=None)"
        )
    if len(engine.modules) != len(engine.store.modules):
        raise ConfigError(
            f"an approximate index holds whole rows; this engine scores modules {engine.modules} "
            "only: drop modules= to use the index, or query exactly (index=None)"
        )
    if engine.distributed:
        raise ConfigError(
            "an approximate index is searched by one process: use distributed=False with index="
        )
    if index is not None and mode is not None and metric_for(mode) != index.metric:
        raise ConfigError(
            f"mode {mode!r} needs a {metric_for(mode)} index, this one is {index.metric}: build one "
            f"with `logix index {engine.store.path} --build --metric {metric_for(mode)}` and pass "
            f"index=logix.open_index(store, {metric_for(mode)!r}), or query exactly (index=None)"
        )


def engine_index(engine: Any, index: ApproximateIndex | str) -> ApproximateIndex:
    """The `index=` argument of an `InfluenceEngine` ("saved": the run directory's index for
    the engine's mode), checked against the engine's configuration and its store's content."""
    if isinstance(index, str):
        if index != "saved":
            raise ValueError(f"index must be an ApproximateIndex, 'saved' or None, got {index!r}")
        check_engine(engine, None)
        index = open_index(engine.store, metric_for(engine.mode))
    elif not isinstance(index, ApproximateIndex):
        raise TypeError(f"index must be an ApproximateIndex, 'saved' or None, got {type(index).__name__}")
    check_engine(engine, index, engine.mode)
    index.check_store(engine.store)
    return index
