"""`InfluenceEngine`: stream a store's rows once per query batch, one matrix product per chunk.

    I(q, z) = Σ_m ⟨G̃_{q,m}, (F_m + λ_m I)⁻¹ G̃_{z,m}⟩

The queries are preconditioned once (Q' = Q (F + λI)⁻¹, float64, then float32); each chunk X of
train rows costs `scores[:, chunk] = Q' Xᵀ`. Memory is bounded by the chunk size, never by the
store: full score matrices are as large as the caller asks for, top-k keeps k per query.
A positive score means the training example helps the query (up-weighting it lowers the
query's loss). Modes: `dot`; `cosine` (both sides normalised in the (F + λI)⁻¹ metric);
`relative` (RelatIF: divided by √I(z, z)). Per-module scores of cosine / relative use the
total norms, so per-module scores always sum to the total.

With `refine=k` (EK-FAC only) the queries are refined towards (F_raw + λI)⁻¹q by k more passes
over the store (`curvature/refine.py`); the train-side norms of cosine / relative scores and
self-influence stay in the EK-FAC metric.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from logix import comm
from logix.curvature.reduce import share_statistics
from logix.query.distributed import local_share, merge_top_k
from logix.curvature.covariance import ProgressFn
from logix.curvature.precondition import build_preconditioner, check_choice
from logix.curvature.refine import RefinedPreconditioner
from logix.curvature.true_fisher import held_fisher
from logix.query.results import Scores, SelfInfluence, TopK, write_scores
from logix.store.format import StoreError
from logix.store.gradients import Gradients
from logix.store.reader import TORCH_DTYPES, Store, open_store

if TYPE_CHECKING:
    from logix.capture.tokens import TokenGradients
    from logix.query.tokens import TokenScores

MODES = ("dot", "cosine", "relative")
SELF_MODES = ("dot", "relative")
_INDEX_BITS = 32  # top-k packs (score, train index) into one int64 key


class InfluenceEngine:
    """Influence of a store's training rows on query gradients.

    store: a `Store` or a run directory; preconditioner: "identity" | "raw" | "kfac" | "ekfac";
    damping: relative to the mean eigenvalue of each F_m, or absolute with
    `damping_absolute=True`; refine: EK-FAC-preconditioned passes towards the exact (raw)
    solve, `refine_method` "cg" | "richardson" (see `logix.curvature.refine`), residuals in
    `refinement_residuals`; fisher: "empirical" (curvature of the stored rows) or "true"
    (under the model's own predictions, from a `run.fit_curvature(fisher="true")` pass), default:
    "true" when the store holds those statistics for the preconditioner (with a notice);
    modules: names to include (default all); device: default CUDA when available;
    chunk_rows: train rows per matrix product; progress: optional
    `fn(phase, rows_done, rows_total)`.

    distributed=True: every rank of the torch.distributed group builds the engine on the same
    store and calls the same methods with the same queries; each rank streams only its share
    of the shards (contiguous, balanced by rows) and every rank gets the whole result, equal
    to one process's. Without a process group it is one rank: the same code path.
    """

    def __init__(self, store: Store | str | os.PathLike, preconditioner: str = "raw",
                 damping: float = 0.1, *, damping_absolute: bool = False, refine: int = 0,
                 refine_method: str = "cg", modules: list[str] | str | None = None,
                 device: str | torch.device | None = None, chunk_rows: int = 4096,
                 progress: ProgressFn | None = None, distributed: bool = False,
                 fisher: str | None = None) -> None:
        if isinstance(store, (str, os.PathLike)):
            store = open_store(Path(store))
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.store = store
        self.chunk_rows = int(chunk_rows)
        self.progress = progress
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        if len(store) == 0:
            raise StoreError(
                f"store {store.path}, segment {store.segment!r} has no rows: log training data "
                f"into it first, or pick another segment (segments: {store.segments})")
        if isinstance(refine, bool) or int(refine) != refine or refine < 0:
            raise ValueError(f"refine must be a whole number of passes >= 0, got {refine!r}")
        if refine and preconditioner != "ekfac":
            raise ValueError(f"refine={refine} needs preconditioner='ekfac' (got {preconditioner!r}): "
                             "the refinement is preconditioned by EK-FAC")
        # fisher=None follows the store: its true-Fisher statistics when it holds them.
        fisher = held_fisher(store, preconditioner, "empirical" if fisher is None and refine else fisher)
        if refine and fisher == "true":
            raise ValueError("refine streams the stored rows, i.e. it converges to the empirical "
                             "Fisher's solve; it cannot refine a fisher='true' preconditioner")
        self.modules = self._select(modules)
        self.distributed = bool(distributed)
        # The rows this process streams: its share of the shards, or all of them.
        self._rows = local_share(store) if self.distributed else store

        def build():
            return build_preconditioner(
                store, preconditioner, damping, absolute=damping_absolute, modules=self.modules,
                device=self.device, chunk_rows=self.chunk_rows, progress=progress,
                fisher=fisher)

        if self.distributed:  # statistics from a split pass; one preconditioner, sent to all
            if fisher != "true":  # true-Fisher statistics come from a model pass, not the rows
                share_statistics(store, self._rows, preconditioner,
                                      chunk_rows=self.chunk_rows, progress=progress)
            self.preconditioner = comm.on_rank0(build)
        else:
            self.preconditioner = build()
        self.fisher = fisher
        self.refine = int(refine)
        if self.refine:
            # Distributed: every rank runs the same iterations, each F V pass streaming its own
            # share of the rows, the products summed over ranks.
            self.preconditioner = RefinedPreconditioner(
                self.preconditioner, self._rows, self.refine, method=refine_method,
                chunk_rows=self.chunk_rows, device=self.device, progress=progress,
                reduce=comm.all_reduce_sum if self.distributed else None)
        self._selected = self.preconditioner.selected

    @property
    def refinement_residuals(self) -> torch.Tensor | None:
        """Relative residuals ‖q − (F + λI)x‖/‖q‖ of the last query batch, [passes, n_query]
        (row i: after i corrections, row 0 plain EK-FAC); None without refinement."""
        return self.preconditioner.residuals if self.refine else None

    def _select(self, modules: list[str] | str | None) -> list[str]:
        return selected_modules(self.store, modules)

    # ------------------------------------------------------------------------------ queries
    def _queries(self, q: Gradients | torch.Tensor,
                 precondition: bool = True) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(Q' [n, D] float32, √(qᵀ(F+λI)⁻¹q) [n] float32, ids), on the engine's device;
        with precondition=False the queries are only checked (two empty tensors come back)."""
        if isinstance(q, Gradients):
            if q.fingerprint != self.store.fingerprint:
                raise StoreError(
                    f"the query gradients were captured with other projections or another model "
                    f"(fingerprint {q.fingerprint[:12]!r} vs the store's "
                    f"{self.store.fingerprint[:12]!r}): capture them with "
                    f"logix.init({str(self.store.path)!r}, mode='query') on this run's model")
            if list(q.modules) != list(self.store.modules):
                raise StoreError("the query gradients' module table differs from the store's: "
                                 + _table_difference(list(q.modules), list(self.store.modules)))
            values, ids = q.values, list(q.data_ids)
        elif isinstance(q, torch.Tensor):  # raw rows: the caller vouches for their layout
            values, ids = q, list(range(q.shape[0])) if q.ndim == 2 else []
        else:
            raise TypeError(f"queries must be logix Gradients (run.gradients()), got {type(q).__name__}")
        if values.ndim != 2 or values.shape[1] != self.store.width:
            raise StoreError(f"query rows have shape {tuple(values.shape)}; the store's rows are "
                             f"[n, {self.store.width}]")
        if values.shape[0] == 0:
            raise ValueError("no query rows: capture at least one query example")
        finite = torch.isfinite(values).all(dim=1)
        if not bool(finite.all()):
            bad = [ids[i] for i in (~finite).nonzero().flatten().tolist()][:10]
            raise ValueError(f"query gradients contain NaN/inf (query ids {bad}): the loss of "
                             "these examples is not finite; check the model's outputs for them")
        if not precondition:
            n, width = values.shape
            return torch.empty(n, width, device=self.device), torch.empty(n, device=self.device), ids
        v = values.to(self.device, torch.float64)
        qp = self.preconditioner.apply(v)
        norms = (v * qp).sum(dim=1).clamp(min=0).sqrt()
        return qp.to(torch.float32), norms.to(torch.float32), ids

    def _shared_queries(self, q: Gradients | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        """`_queries`; in a distributed engine every rank checks its queries and rank 0's Q' and
        norms go to all (the ranks must pass the same query ids; values may differ in the last
        bits, e.g. captured on different GPUs)."""
        if not self.distributed:
            return self._queries(q)
        # Refinement passes are collective (every rank streams its share), so then all ranks
        # precondition; otherwise rank 0 alone does.
        precondition = comm.rank_and_world()[0] == 0 or self.refine > 0
        qp, qnorm, ids = comm.together(lambda: self._queries(q, precondition=precondition))
        comm.check_same("the queries", (tuple(qp.shape), ids),
                        "pass the same query gradients (same ids, same order) on every rank")
        return comm.broadcast(qp), comm.broadcast(qnorm), ids

    # ------------------------------------------------------------------------------ streaming
    def _chunks(self, phase: str) -> Iterator[tuple[int, list, torch.Tensor]]:
        """(first row index, ids, rows [c, D] float32 on the device), in row order."""
        cuda = self.device.type == "cuda"
        dtype = TORCH_DTYPES[self.store.dtype] if cuda else torch.float32
        # The reader asks the kernel to read the next chunk ahead while this one is scored.
        # Two reused buffers: a chunk is consumed before the next-but-one is read (no page faults).
        source = self._rows.iter_chunks(rows=self.chunk_rows, dtype=dtype, buffers=2)
        if cuda:
            source = _to_cuda(source, self.device, self.chunk_rows, self.store.width, dtype)
        total, done = len(self._rows), 0
        start = self._rows.row_offset  # global index of this process's first row
        for ids, x in source:
            yield start, ids, x.to(self.device, torch.float32)
            start += len(ids)
            done += len(ids)
            if self.progress is not None:
                self.progress(phase, done, total)

    def _score(self, qp: torch.Tensor, qnorm: torch.Tensor, x: torch.Tensor, mode: str,
               per_module: bool) -> torch.Tensor:
        """Scores of one chunk: [n_query, c] (or [n_modules, n_query, c])."""
        if per_module:
            s = torch.stack([qp[:, m.columns] @ x[:, m.columns].T for m in self._selected])
        else:
            s = qp @ x.T
        if mode != "dot":
            denom = self.preconditioner.quadratic(x).sqrt()[None, :]
            if mode == "cosine":
                denom = qnorm[:, None] * denom
            s = torch.where(denom > 0, s / denom, torch.zeros_like(s))
        return s

    def _check_finite(self, flags: list[tuple[torch.Tensor, int, list]]) -> None:
        """Raise if a chunk produced NaN/inf (one sync at the end, not one per chunk)."""
        bad = torch.stack([f for f, _, _ in flags]).cpu() if flags else torch.zeros(0, dtype=torch.bool)
        if bool(bad.any()):
            _, start, ids = flags[int(bad.nonzero()[0])]
            raise StoreError(
                f"train rows {start}..{start + len(ids) - 1} (ids {ids[0]!r}..{ids[-1]!r}) give "
                f"non-finite scores: the store holds NaN/inf values; check it with "
                f"`logix inspect {self.store.path}` and log those examples again")

    # ------------------------------------------------------------------------------ public
    def scores(self, q: Gradients | torch.Tensor, mode: str = "dot", per_module: bool = False) -> Scores:
        """The full score matrix: `.values` [n_query, n_train] ([n_modules, …] if per_module)."""
        out, qids = self._local_scores(q, mode, per_module)
        if self.distributed:
            out = comm.all_gather_columns(out)
        return Scores(out, qids, list(self.store.data_ids), mode,
                      [m.name for m in self._selected] if per_module else None, self._meta())

    def save_scores(self, q: Gradients | torch.Tensor, path: str | os.PathLike, mode: str = "dot",
                    per_module: bool = False, *, block_bytes: int = 64 << 20) -> Path:
        """Write the full score matrix to `path` (.safetensors, read back by `load_result`)
        without holding it whole: in a distributed engine each rank computes its columns and
        rank 0 gathers and writes them a few matrix rows (about `block_bytes`) at a time (only
        rank 0 needs `path`); memory per rank is its own column block. Returns `path`."""
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"save_scores writes .safetensors files, got {path}")
        out, qids = self._local_scores(q, mode, per_module)
        rows = out.reshape(-1, out.shape[-1])  # [(n_modules ·) n_query, n_local]
        step = max(1, int(block_bytes) // (4 * len(self.store)))
        blocks = ((comm.gather_columns_to(rows[b:b + step]) if self.distributed
                   else rows[b:b + step]) for b in range(0, rows.shape[0], step))
        result = Scores(torch.empty(0), qids, list(self.store.data_ids), mode,
                        [m.name for m in self._selected] if per_module else None, self._meta())
        shape = (*out.shape[:-1], len(self.store))

        def write() -> None:
            try:
                write_scores(path, shape, blocks, result)
            finally:
                for _ in blocks:  # other ranks wait in the gather until every block is taken
                    pass

        if comm.rank_and_world()[0] == 0 or not self.distributed:
            comm.together(write)
        else:
            comm.together(lambda: [None for _ in blocks])
        return path

    def _local_scores(self, q: Gradients | torch.Tensor, mode: str,
                      per_module: bool) -> tuple[torch.Tensor, list]:
        """This process's columns of the score matrix ([..., n_query, n_local]) and query ids."""
        check_choice(mode, MODES, "mode")
        qp, qnorm, qids = self._shared_queries(q)

        def compute() -> torch.Tensor:
            n, offset = len(self._rows), self._rows.row_offset
            shape = (len(self._selected), qp.shape[0], n) if per_module else (qp.shape[0], n)
            out = torch.empty(shape, dtype=torch.float32)
            flags = []
            for start, ids, x in self._chunks("scores"):
                s = self._score(qp, qnorm, x, mode, per_module)
                flags.append((~torch.isfinite(s).all(), start, ids))
                out[..., start - offset:start - offset + len(ids)] = s.cpu()
            self._check_finite(flags)
            return out

        return (comm.together(compute) if self.distributed else compute()), qids

    def top_k(self, q: Gradients | torch.Tensor, k: int = 10, mode: str = "dot") -> TopK:
        """The k highest-scoring train rows per query, best first; `.values`/`.indices` [n_query, k].

        Ties go to the lower train index (the result equals a stable descending argsort of the
        full matrix). A k above the number of train rows returns all rows (k = n_train).
        """
        check_choice(mode, MODES, "mode")
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(int(k), len(self.store))
        if len(self.store) >= 1 << _INDEX_BITS:
            raise ValueError("top_k handles segments of fewer than 2**32 rows; split the store")
        qp, qnorm, qids = self._shared_queries(q)

        def compute() -> torch.Tensor:
            best = torch.empty((qp.shape[0], 0), dtype=torch.long, device=self.device)
            flags = []
            for start, ids, x in self._chunks("top_k"):
                s = self._score(qp, qnorm, x, mode, False)
                flags.append((~torch.isfinite(s).all(), start, ids))
                keys = torch.cat([best, _candidates(s, start, k)], dim=1)
                best = torch.topk(keys, min(k, keys.shape[1]), dim=1).values
            self._check_finite(flags)
            return best

        if self.distributed:  # keys carry global train indices: the merge is one more top-k
            best = merge_top_k(comm.together(compute), k)
        else:
            best = compute()
        best_v, best_i = _unpack(best.cpu())
        train = self.store.data_ids
        data_ids = [[train[j] for j in row] for row in best_i.tolist()]
        return TopK(best_v, best_i, data_ids, qids, mode, self._meta())

    def token_scores(self, q: Gradients | torch.Tensor, tokens: "TokenGradients", mode: str = "dot",
                     per_module: bool = False) -> "TokenScores":
        """Per-position scores of a few recomputed sequences (`query.token_gradients()` of
        `per_token=True` blocks): `.values` [n_query, n_docs, T], summing over T to the
        sequences' `scores(q, mode)`. See `logix.query.tokens`."""
        from logix.query.tokens import token_scores

        check_choice(mode, MODES, "mode")
        return token_scores(self, q, tokens, mode=mode, per_module=per_module)

    def self_influence(self, mode: str = "dot", per_module: bool = False) -> SelfInfluence:
        """I(z, z) = xᵀ(F+λI)⁻¹x per train row: `.values` [n_train] ([n_modules, n_train]).

        mode "relative" returns √I(z, z), the train-side normaliser of RelatIF.
        """
        check_choice(mode, SELF_MODES, "self-influence mode")

        def compute() -> torch.Tensor:
            parts = [torch.zeros((len(self._selected), 0) if per_module else (0,))]
            for _, _, x in self._chunks("self_influence"):
                v = self.preconditioner.quadratic(x, per_module=per_module)
                parts.append((v.sqrt() if mode == "relative" else v).cpu())
            values = torch.cat(parts, dim=-1)
            if not bool(torch.isfinite(values).all()):
                raise StoreError(f"the store holds NaN/inf values; check it with "
                                 f"`logix inspect {self.store.path}`")
            return values

        values = comm.all_gather_columns(comm.together(compute)) if self.distributed else compute()
        return SelfInfluence(values, list(self.store.data_ids), mode,
                             [m.name for m in self._selected] if per_module else None, self._meta())

    def _meta(self) -> dict[str, Any]:
        meta = {"preconditioner": self.preconditioner.kind, "fisher": self.fisher,
                "segment": self.store.segment,
                "modules": self.modules, "damping": self.preconditioner.dampings}
        if self.refine:
            meta["refine"] = self.refine
        return meta


def selected_modules(store: Store, modules: list[str] | str | None) -> list[str]:
    """The names of `modules` (all when None) in the store's table order; unknown names are an
    error that suggests the closest one."""
    names = [m.name for m in store.modules]
    if modules is None:
        return names
    chosen = [modules] if isinstance(modules, str) else list(modules)
    if not chosen:
        raise ValueError("modules is empty: pass None for all modules, or some of " + str(names))
    for name in chosen:
        check_choice(name, tuple(names), "module")
    return [n for n in names if n in set(chosen)]


def _table_difference(a: list, b: list) -> str:
    """The first difference between two module tables, in words."""
    if [m.name for m in a] != [m.name for m in b]:
        return f"query modules {[m.name for m in a]} vs store modules {[m.name for m in b]}"
    for x, y in zip(a, b):
        if x != y:
            return f"module {x.name!r}: query {x.to_dict()} vs store {y.to_dict()}"
    return "unknown difference"


def _candidates(s: torch.Tensor, start: int, k: int) -> torch.Tensor:
    """Packed keys of a chunk's entries that can enter the top-k: [n, ≤ c] int64.

    A float top-(k+1) finds each row's k best; only when the (k+1)-th ties with the k-th (so
    the float top-k's choice among equal scores is arbitrary) is the whole chunk packed.
    """
    if s.shape[1] <= k:
        return _pack(s, start)
    values, index = torch.topk(s, k + 1, dim=1)
    if bool((values[:, k] == values[:, k - 1]).any()):
        return _pack(s, start)
    return _pack(values[:, :k], start, index[:, :k] + start)


def _pack(values: torch.Tensor, start: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [n, c] of train rows `index` -> distinct int64 keys ordered like (score ↓, index ↑).

    The high 32 bits are the float32 score mapped to an order-preserving int32 (negative floats
    get their magnitude bits flipped), the low 32 bits the inverted train index; so a top-k of
    keys is exactly a stable descending argsort of the scores, with no sort of the chunk.
    """
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    if index is None:  # the columns are the rows start, start + 1, ...
        index = torch.arange(start, start + values.shape[1], device=values.device)
    return (ordered << _INDEX_BITS) | ((1 << _INDEX_BITS) - 1 - index)


def _unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `_pack`: (scores float32, train indices int64)."""
    ordered = keys >> _INDEX_BITS  # arithmetic shift keeps the sign
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    index = (1 << _INDEX_BITS) - 1 - (keys & ((1 << _INDEX_BITS) - 1))
    return bits.to(torch.int32).view(torch.float32), index


def _to_cuda(items: Iterator, device: torch.device, rows: int, width: int,
             dtype: torch.dtype) -> Iterator:
    """Copy host chunks to the device through two pinned buffers on a side stream.

    The copy of chunk i+1 runs while chunk i is being scored; the compute stream waits for
    each copy, and a buffer is refilled only after its previous copy has completed.
    """
    copy_stream = torch.cuda.Stream(device)
    pinned = [torch.empty((rows, width), dtype=dtype, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]
    for n, (ids, x) in enumerate(items):
        slot = n % 2
        if copied[slot] is not None:
            copied[slot].synchronize()
        host = pinned[slot][: x.shape[0]]
        host.copy_(x)
        with torch.cuda.stream(copy_stream):
            on_device = host.to(device, non_blocking=True)
            copied[slot] = torch.cuda.Event()
            copied[slot].record(copy_stream)
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        on_device.record_stream(compute)
        yield ids, on_device.to(torch.float32)  # upcast from the storage dtype on the device
