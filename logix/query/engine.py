"""`InfluenceEngine`: stream a store's rows once per query batch, one matrix product per chunk.

    I(q, z) = Σ_m ⟨G̃_{q,m}, (F_m + λ_m I)⁻¹ G̃_{z,m}⟩

The queries are prepared once per batch (`Preconditioner.query_side`: Q' = Q (F + λI)⁻¹, or
for Gram-form blocks the store's rows preconditioned instead); each chunk X of train rows
costs one product, `scores[:, chunk] = Q' Xᵀ`. Memory is bounded by the chunk size in bytes,
never by the store: full score matrices are as large as the caller asks for, top-k keeps k per
query. A positive score means the training example helps the query (up-weighting it lowers the
query's loss). Modes: `dot`; `cosine` (both sides normalised in the (F + λI)⁻¹ metric);
`relative` (RelatIF: divided by √I(z, z)). Per-module scores of cosine / relative use the
total norms, so per-module scores always sum to the total.

Defaults (preconditioner, damping, refine, fisher, mode) come from the store's config (`query:`
section, `query/defaults.py`), exactly as for `logix query`.

With `refine=k` (EK-FAC only) the queries are refined towards (F_raw + λI)⁻¹q by k more passes
over the store (`curvature/refine.py`); the train-side norms of cosine / relative scores and
self-influence stay in the EK-FAC metric.

The preconditioner's set-up is in `engine_setup.py`; one process's passes over its rows in `local_rows.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from logix import comm
from logix.errors import ConfigError
from logix.progress import ProgressBars, ProgressFn, closing
from logix.query.defaults import resolve
from logix.query.distributed import local_share, merge_top_k
from logix.query.engine_setup import check_store_ready, checked_fisher, engine_device, engine_preconditioner
from logix.query.local_rows import LocalRows
from logix.query.queries import prepared_side, selected_modules, shared_queries
from logix.query.result_files import save_columns
from logix.query.results import Scores, SelfInfluence, TopK
from logix.query.topk import INDEX_BITS, unpack
from logix.query.transfer import DEFAULT_CHUNK_BYTES, rows_per_chunk
from logix.store.gradients import Gradients
from logix.store.reader import Store, open_store
from logix.vocabulary import SCORE_MODES, SELF_INFLUENCE_MODES, check_choice

if TYPE_CHECKING:
    from logix.capture.tokens import TokenGradients
    from logix.query.index import ApproximateIndex
    from logix.query.rerank import Rerank
    from logix.query.tokens import TokenScores

Queries = Gradients | torch.Tensor


class InfluenceEngine:
    """Influence of a store's training rows on query gradients.

    store: a `Store` or a run directory. preconditioner ("identity" | "raw" | "kfac" | "ekfac"),
    damping, refine, fisher and mode: default the store's `query:` config. damping: relative to
    the mean eigenvalue of each F_m, or absolute with `absolute_damping=True`; refine:
    EK-FAC-preconditioned passes towards the exact (raw) solve, `refine_method` "cg" |
    "richardson" (see `logix.curvature.refine`), residuals in `refinement_residuals`; fisher:
    "empirical" (curvature of the stored rows) or "true" (under the model's own predictions,
    from a `run.fit_curvature(fisher="true")` pass), "auto": "true" when the store holds those
    statistics for the preconditioner (with a notice), else "empirical"; mode: the default score mode of the
    methods; modules: names to include (default all); device: default CUDA when available;
    chunk_bytes: bytes of one float32 chunk of train rows (three host buffers: scored, read
    ahead, being read; a store of one chunk is kept resident); progress: a callback
    `fn(phase, done, total)` for every pass (default: rich bars on stderr, rows/s and ETA, when
    stderr is a terminal, `logix.progress.ProgressBars`); quiet: no bars.

    distributed=True: every rank of the torch.distributed group builds the engine on the same
    store and calls the same methods with the same queries; each rank streams only its share
    of the shards (contiguous, balanced by rows) and every rank gets the whole result, equal
    to one process's. Without a process group it is one rank: the same code path.

    index: answer `top_k` (and re-ranking's first stage) from an approximate index instead of
    scanning the store: an `ApproximateIndex` (`logix.build_index` / `logix.open_index`) or
    "saved" (the run directory's index for `mode`, checked to be current); identity
    preconditioner only (see `logix.query.index`). Default None: the exact scan.

    form: how a `raw` preconditioner is held, "auto" (Gram form for the blocks wider than the
    store is long, else the eigendecomposition), "eigen" or "gram" (`build_preconditioner`);
    `preconditioner.spectral` needs "eigen".
    """

    def __init__(
        self,
        store: Store | str | os.PathLike,
        preconditioner: str | None = None,
        damping: float | None = None,
        *,
        absolute_damping: bool = False,
        refine: int | None = None,
        refine_method: str = "cg",
        modules: list[str] | str | None = None,
        device: str | torch.device | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: ProgressFn | None = None,
        distributed: bool = False,
        fisher: str | None = None,
        mode: str | None = None,
        quiet: bool = False,
        index: ApproximateIndex | str | None = None,
        form: str = "auto",
    ) -> None:
        if isinstance(store, (str, os.PathLike)):
            store = open_store(Path(store))
        self.chunk_rows = rows_per_chunk(chunk_bytes, store.width)
        chosen = resolve(store, preconditioner, damping, refine, fisher, mode)
        preconditioner, damping, refine, fisher = (
            chosen[k] for k in ("preconditioner", "damping", "refine", "fisher")
        )
        self.damping = damping  # as given or the store's default (λ_m per module: `dampings`)
        self.mode = check_choice(chosen["mode"], SCORE_MODES, "mode")
        self.store = store
        self.progress = progress = ProgressBars(quiet=quiet) if progress is None else progress
        self.device = engine_device(device)  # checked now; device=0 is cuda:0
        check_store_ready(store)
        fisher = checked_fisher(store, preconditioner, refine, fisher)
        self.modules = selected_modules(store, modules)
        self.distributed = bool(distributed)
        # The rows this process streams: its share of the shards, or all of them.
        self._rows = local_share(store) if self.distributed else store
        with closing(progress):  # an error mid-build leaves no bar drawn
            self.preconditioner = engine_preconditioner(
                store,
                self._rows,
                preconditioner,
                damping,
                refine,
                fisher,
                absolute_damping=absolute_damping,
                refine_method=refine_method,
                modules=self.modules,
                device=self.device,
                chunk_rows=self.chunk_rows,
                progress=progress,
                distributed=self.distributed,
                form=form,
            )
        self.fisher = fisher
        self.refine = int(refine)
        self._selected = self.preconditioner.selected
        self._local = LocalRows(
            self._rows, store, self.preconditioner, self.device, self.chunk_rows, progress
        )
        if index is not None:
            from logix.query.index import engine_index

            index = engine_index(self, index)
        self.index = index

    @property
    def refinement_residuals(self) -> torch.Tensor | None:
        """Relative residuals ‖q − (F + λI)x‖/‖q‖ of the last query batch, [passes, n_query]
        (row i: after i corrections, row 0 plain EK-FAC); None without refinement."""
        return self.preconditioner.residuals if self.refine else None

    # ------------------------------------------------------------------------------ queries
    def _shared_queries(
        self, q: Queries, streamed: bool = False, norms: bool = True
    ) -> tuple[Any, torch.Tensor, list]:
        """(Q' [n, D] float32 — or with `streamed` the `QuerySide` that `_score` takes —,
        √(qᵀ(F+λI)⁻¹q) [n] float32, ids) on the engine's device; see `shared_queries`."""
        args = (q, self.store, self.preconditioner, self.device)
        return shared_queries(*args, streamed, norms, self.distributed, self.refine > 0)

    def _mode(self, mode: str | None, choices: tuple[str, ...] = SCORE_MODES, what: str = "mode") -> str:
        return check_choice(self.mode if mode is None else mode, choices, what)

    # ------------------------------------------------------------------------------ public
    def scores(
        self, q: Queries, mode: str | None = None, per_module: bool = False, *, prepared: bool = False
    ) -> Scores:
        """The full score matrix: `.values` [n_query, n_train] ([n_modules, …] if per_module).

        prepared: q is a query side the caller mapped already (e.g. Q f(F + λI) from
        `self.preconditioner.spectral`, as `stagewise_scores` does), scored as it is in mode "dot"
        (`queries.prepared_side`; one process)."""
        mode = self._mode(mode)
        if prepared and (mode != "dot" or self.distributed):
            raise ConfigError("prepared queries are scored in mode 'dot' by a non-distributed engine")
        out, qids = self._local_scores(q, mode, per_module, prepared)
        if self.distributed:
            out = comm.all_gather_columns(out)
        return Scores(
            out,
            qids,
            list(self.store.data_ids),
            mode,
            [m.name for m in self._selected] if per_module else None,
            self._meta(),
        )

    def save_scores(
        self,
        q: Queries,
        path: str | os.PathLike,
        mode: str | None = None,
        per_module: bool = False,
        *,
        block_bytes: int = 64 << 20,
    ) -> Path:
        """Write the full score matrix to `path` (.safetensors, read back by `load_result`)
        without holding it whole: in a distributed engine each rank computes its columns and
        rank 0 gathers and writes them a few matrix rows (about `block_bytes`) at a time (only
        rank 0 needs `path`); memory per rank is its own column block. Returns `path`."""
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"save_scores writes .safetensors files, got {path}")
        mode = self._mode(mode)
        out, qids = self._local_scores(q, mode, per_module)
        like = Scores(
            torch.empty(0),
            qids,
            list(self.store.data_ids),
            mode,
            [m.name for m in self._selected] if per_module else None,
            self._meta(),
        )
        return save_columns(path, out, len(self.store), like, self.distributed, block_bytes)

    def _local_scores(
        self, q: Queries, mode: str, per_module: bool, prepared: bool = False
    ) -> tuple[torch.Tensor, list]:
        """This process's columns of the score matrix ([..., n_query, n_local]) and query ids."""
        qp, qnorm, qids = (
            prepared_side(q, self.store, self.preconditioner, self.device)
            if prepared
            else self._shared_queries(q, streamed=True, norms=mode == "cosine")
        )

        def compute() -> torch.Tensor:
            with closing(self.progress):
                return self._local.score_columns(qp, qnorm, mode, per_module)

        return (comm.together(compute) if self.distributed else compute()), qids

    def top_k(self, q: Queries, k: int = 10, mode: str | None = None, rerank: Rerank | None = None) -> TopK:
        """The k highest-scoring train rows per query, best first; `.values`/`.indices` [n_query, k].

        Ties go to the lower train index (the result equals a stable descending argsort of the
        full matrix). A k above the number of train rows returns all rows (k = n_train).
        `rerank`: re-rank the top candidates by their best window of positions (`query/rerank.py`).
        With the engine's `index`, the top k come from the approximate index (re-ranking's
        candidates too), in the same order convention, with `.meta["index"]`.
        """
        mode = self._mode(mode)
        if rerank is not None:
            return rerank.top_k(self, q, k, mode)
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(int(k), len(self.store))
        if len(self.store) >= 1 << INDEX_BITS:
            raise ValueError("top_k handles segments of fewer than 2**32 rows; split the store")
        if self.index is not None:
            from logix.query.index_top_k import index_top_k

            return index_top_k(self, self.index, q, k, mode)
        qp, qnorm, qids = self._shared_queries(q, streamed=True, norms=mode == "cosine")

        def compute() -> torch.Tensor:
            with closing(self.progress):
                return self._local.best(qp, qnorm, mode, k)

        if self.distributed:  # keys carry global train indices: the merge is one more top-k
            best = merge_top_k(comm.together(compute), k)
        else:
            best = compute()
        best_v, best_i = unpack(best.cpu())
        train = self.store.data_ids
        train_ids = [[train[j] for j in row] for row in best_i.tolist()]
        return TopK(best_v, best_i, train_ids, qids, mode, self._meta())

    def token_scores(
        self, q: Queries, tokens: TokenGradients, mode: str | None = None, per_module: bool = False
    ) -> TokenScores:
        """Per-position scores of a few recomputed sequences (`query.token_gradients()` of
        `per_token=True` blocks): `.values` [n_query, n_docs, T], summing over T to the
        sequences' `scores(q, mode)`. See `logix.query.tokens`."""
        from logix.query.tokens import token_scores

        return token_scores(self, q, tokens, mode=self._mode(mode), per_module=per_module)

    def self_influence(self, mode: str = "dot", per_module: bool = False) -> SelfInfluence:
        """I(z, z) = xᵀ(F+λI)⁻¹x per train row: `.values` [n_train] ([n_modules, n_train]).

        mode "relative" returns √I(z, z), the train-side normaliser of RelatIF.
        """
        mode = self._mode(mode, SELF_INFLUENCE_MODES, "self-influence mode")

        def compute() -> torch.Tensor:
            with closing(self.progress):
                return self._local.self_influence(mode, per_module)

        values = comm.all_gather_columns(comm.together(compute)) if self.distributed else compute()
        return SelfInfluence(
            values,
            list(self.store.data_ids),
            mode,
            [m.name for m in self._selected] if per_module else None,
            self._meta(),
        )

    def _meta(self) -> dict[str, Any]:
        meta = {
            "preconditioner": self.preconditioner.kind,
            "fisher": self.fisher,
            "segment": self.store.segment,
            "modules": self.modules,
            "damping": self.preconditioner.dampings,
        }
        if self.refine:
            meta["refine"] = self.refine
        return meta
