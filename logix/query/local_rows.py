"""One process's train rows, streamed chunk by chunk: its score columns, top-k keys, self-influence."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from logix.curvature.covariance import ProgressFn
from logix.errors import StoreError
from logix.query.topk import new_best, update_best
from logix.query.transfer import check_finite_chunks, device_chunks
from logix.store.reader import Store


class LocalRows:
    """The rows this process streams (`rows`: the store or its share of the shards) and the
    passes over them, each one matrix product per chunk against the prepared query side.

    Rows that fit in one chunk are read once and kept: the memory one streamed chunk would take.
    `store` names the store in errors; progress: optional `fn(phase, rows_done, rows_total)`.
    """

    def __init__(
        self,
        rows: Any,
        store: Store,
        preconditioner: Any,
        device: torch.device,
        chunk_rows: int,
        progress: ProgressFn | None,
    ) -> None:
        self.rows = rows
        self.store = store
        self.preconditioner = preconditioner
        self.selected = preconditioner.selected
        self.device = device
        self.chunk_rows = chunk_rows
        self.progress = progress
        self._resident: list[tuple[list, torch.Tensor]] | None = None  # a one-chunk share

    def chunks(self, phase: str) -> Iterator[tuple[int, list, torch.Tensor]]:
        """(global index of the first row, ids, rows [c, D] float32 on the device), in row order."""
        total, done = len(self.rows), 0
        start = self.rows.row_offset  # global index of this process's first row
        if total <= self.chunk_rows:
            if self._resident is None:
                self._resident = [
                    (ids, x.clone()) for ids, x in device_chunks(self.rows, self.device, self.chunk_rows)
                ]
            source = iter(self._resident)
        else:
            source = device_chunks(self.rows, self.device, self.chunk_rows)
        for ids, x in source:
            yield start, ids, x
            start += len(ids)
            done += len(ids)
            if self.progress is not None:
                self.progress(phase, done, total)

    def chunk_scores(
        self, qp: Any, qnorm: torch.Tensor, x: torch.Tensor, start: int, mode: str, per_module: bool
    ) -> torch.Tensor:
        """Scores of the chunk x of rows start..: [n_query, c] (or [n_modules, n_query, c]);
        `qp` is the streamed query side (`shared_queries(..., streamed=True)`), `qnorm` [n_query]
        the queries' norms in the (F + λI)⁻¹ metric (read by mode "cosine")."""
        pre = self.preconditioner
        if per_module:
            s = torch.stack([pre.score_module(qp, x, m, start) for m in self.selected])
        else:
            s = pre.score(qp, x, start)
        if mode != "dot":
            denom = pre.quadratic(x, start=start).sqrt()[None, :]
            if mode == "cosine":
                denom = qnorm[:, None] * denom
            s = torch.where(denom > 0, s / denom, torch.zeros_like(s))
        return s

    def score_columns(self, qp: Any, qnorm: torch.Tensor, mode: str, per_module: bool) -> torch.Tensor:
        """This process's columns of the score matrix, on the host: [n_query, n_local]
        ([n_modules, n_query, n_local] if per_module)."""
        n, offset = len(self.rows), self.rows.row_offset
        shape = (len(self.selected), qnorm.shape[0], n) if per_module else (qnorm.shape[0], n)
        out = torch.empty(shape, dtype=torch.float32)
        flags = []
        for start, ids, x in self.chunks("scores"):
            s = self.chunk_scores(qp, qnorm, x, start, mode, per_module)
            flags.append((~torch.isfinite(s).all(), start, ids))
            out[..., start - offset : start - offset + len(ids)] = s.cpu()
        check_finite_chunks(flags, self.store, [qp.dense, *qp.rows.values()])
        return out

    def best(self, qp: Any, qnorm: torch.Tensor, mode: str, k: int) -> torch.Tensor:
        """The packed (score, global train index) keys of this process's k best rows per query,
        on the device (`logix.query.topk`)."""
        best = new_best(qnorm.shape[0], self.device)
        flags = []
        for start, ids, x in self.chunks("top_k"):
            s = self.chunk_scores(qp, qnorm, x, start, mode, False)
            flags.append((~torch.isfinite(s).all(), start, ids))
            best = update_best(best, s, start, k)
        check_finite_chunks(flags, self.store, [qp.dense, *qp.rows.values()])
        return best

    def self_influence(self, mode: str, per_module: bool) -> torch.Tensor:
        """xᵀ(F+λI)⁻¹x of each local row (its square root for mode "relative"), on the host:
        [n_local] ([n_modules, n_local] if per_module)."""
        parts = [torch.zeros((len(self.selected), 0) if per_module else (0,))]
        for start, _, x in self.chunks("self_influence"):
            v = self.preconditioner.quadratic(x, per_module=per_module, start=start)
            parts.append((v.sqrt() if mode == "relative" else v).cpu())
        values = torch.cat(parts, dim=-1)
        if not bool(torch.isfinite(values).all()):
            raise StoreError(
                f"the store holds NaN/inf values; check it with `logix inspect {self.store.path}`"
            )
        return values
