"""Stage-wise scores over segments: approximate unrolling (SOURCE, Bae et al. 2024, 2405.12186).

Training is split into segments ℓ = 1..L, in training order. Each has an effective learning
rate η_ℓ, a number of optimizer steps K_ℓ, a training-set size N_ℓ (the examples its loss
averages over), its stored rows g_{z,ℓ} (the examples it trained on, at a representative
checkpoint of the segment) and its curvature H_ℓ = F_ℓ + λ_ℓ I, the damped `raw` Fisher of those
rows. With the queries q captured at the final model, the score of training example z is

    score(q, z) = Σ_ℓ (1/N_ℓ) qᵀ S_L S_{L-1} ⋯ S_{ℓ+1} r_ℓ g_{z,ℓ}
    S_ℓ = exp(−η_ℓ K_ℓ H_ℓ),   r_ℓ = (I − exp(−η_ℓ K_ℓ H_ℓ)) H_ℓ⁻¹

(g_{z,ℓ} = 0 where segment ℓ did not train on z). Where it comes from: in segment ℓ, SGD on
(1/N_ℓ) Σ_n w_n ℓ_n with the Hessian and the gradients held fixed over the segment moves the
response of the parameters to up-weighting z by ε as dθ ← S_ℓ dθ − (ε/N_ℓ) r_ℓ g_{z,ℓ}
(Σ_{k<K} (I − ηH)^k η = (I − (I − ηH)^K) H⁻¹, with (I − ηH)^K ≈ exp(−ηKH)). A positive score
means z helps the query: −dℓ_q/dε = −qᵀ dθ_L/dε.

Approximations, all of SOURCE's or of logix's curvature:
- Each segment's Hessian is its rows' empirical Fisher in projected space, per module
  (block-diagonal); it is held constant over the segment, as are the training gradients (taken
  at whatever checkpoint the rows were logged at: the segment's middle is the representative
  choice). The empirical Fisher underestimates the curvature of well-fitted examples.
- Damping enters as an L2 term (weight decay λ_ℓ) in both S_ℓ and r_ℓ, so that the two limits
  hold exactly: η_ℓK_ℓ → ∞ gives r_ℓ → H_ℓ⁻¹ (damped influence, as `InfluenceEngine` with `raw`),
  η_ℓK_ℓ H_ℓ → 0 gives r_ℓ → η_ℓK_ℓ I (TracIn over the segment's steps).
- SGD with momentum β is treated as plain SGD with the effective rate lr / (1 − β); the
  optimizer's own weight decay and any learning-rate schedule inside a segment are not modelled
  (log a schedule as several segments).
- exp(−ηKH) stands for (I − ηH)^K (they agree while ηH ≪ 1 in every direction).

The matrices act on the query side only: Q_ℓ = Q S_L ⋯ S_{ℓ+1} r_ℓ / N_ℓ is built by one pass
from the last segment to the first in each segment's cached eigenbasis, then each segment's rows
are streamed once through the engine. Cost: L eigendecompositions (cached) + one read of each
segment.

Segment meta (`run.start_segment("stage1", lr=0.1, steps=500, momentum=0.9, examples=1000)`):
`lr` (required; the rate of a mean-reduced loss), `steps` (K; if absent, the batches the run
logged into the segment, `logged_batches`, which is K when the segment's rows are the training
steps themselves, e.g. one epoch per segment), `momentum` (default 0), `examples` (N; default the
segment's row count). `horizons=` / `examples=` arguments override the meta.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from logix.curvature.covariance import ProgressFn
from logix.curvature.precondition import build_preconditioner
from logix.curvature.preconditioner import Preconditioner
from logix.query.engine import InfluenceEngine
from logix.query.queries import selected_modules
from logix.query.results import Scores
from logix.query.segments import open_any, union_ids
from logix.store.format import StoreError
from logix.store.gradients import Gradients
from logix.vocabulary import renamed


@dataclass
class SegmentSchedule:
    """What one segment did: effective rate η, steps K (η·K = `horizon`), examples N."""

    name: str
    lr: float
    steps: float
    examples: int
    steps_from: str  # "meta steps" | "logged batches" | "horizons argument"

    @property
    def horizon(self) -> float:
        """η·K: how far the segment's dynamics ran (in units of 1 / curvature)."""
        return self.lr * self.steps


def segment_schedule(
    segment_store, horizon: float | None = None, examples: int | None = None
) -> SegmentSchedule:
    """The schedule of the selected segment of `segment_store`, from its meta (see module doc)."""
    name, meta = segment_store.segment, segment_store.segment_meta
    n = int(examples) if examples is not None else int(meta.get("examples", len(segment_store)))
    if n < 1:
        raise ValueError(f"segment {name!r}: examples must be at least 1, got {n}")
    if horizon is not None:
        h = float(horizon)
        if not (math.isfinite(h) and h >= 0):
            raise ValueError(f"segment {name!r}: horizon η·K must be finite and ≥ 0, got {horizon}")
        return SegmentSchedule(name, h, 1.0, n, "horizons argument")
    if meta.get("lr") is None:
        raise ValueError(
            f"segment {name!r} has no logged learning rate: log it with "
            f"run.start_segment({name!r}, lr=..., steps=...) or pass horizons={{{name!r}: lr * steps}}"
        )
    momentum = float(meta.get("momentum", 0.0))
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"segment {name!r}: momentum must be in [0, 1), got {momentum}")
    lr = float(meta["lr"]) / (1.0 - momentum)
    if "steps" in meta:
        steps, source = float(meta["steps"]), "meta steps"
    elif "logged_batches" in meta:
        steps, source = float(meta["logged_batches"]), "logged batches"
    else:
        raise ValueError(
            f"segment {name!r} has no step count: log it with run.set_segment_meta(steps=K) (the "
            f"optimizer steps the segment stands for) or pass horizons={{{name!r}: lr * steps}}"
        )
    if not (math.isfinite(lr) and lr >= 0 and math.isfinite(steps) and steps >= 0):
        raise ValueError(f"segment {name!r}: lr and steps must be finite and ≥ 0, got {lr}, {steps}")
    return SegmentSchedule(name, lr, steps, n, source)


def spectral_apply(
    q: torch.Tensor, pre: Preconditioner, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Q ↦ Q f(F + λI) per selected module, with f applied to the damped eigenvalues:
    [n, D] float64 -> [n, D] float64; other modules' columns are zeroed."""
    out = torch.zeros_like(q)
    for m in pre.selected:
        b = pre.blocks[m.name]
        v = b.eigenvectors.to(q.device)
        e = (b.eigenvalues + b.damping).to(q.device)
        out[:, m.columns] = ((q[:, m.columns] @ v) * fn(e)) @ v.T
    return out


def stagewise_scores(
    store,
    queries: Gradients,
    segments: list[str] | None = None,
    *,
    damping: float = 0.1,
    absolute_damping: bool = False,
    horizons: dict[str, float] | None = None,
    examples: dict[str, int] | None = None,
    modules: list[str] | str | None = None,
    device: str | torch.device | None = None,
    chunk_rows: int = 4096,
    progress: ProgressFn | None = None,
    damping_absolute: bool | None = None,
) -> Scores:
    """SOURCE scores of every training example on the queries: `.values` [n_query, n_train].

    store: a `Store` or a run directory; queries: gradients at the *final* model (captured with
    the store's projections); segments: names in training order (default: all, in the order they
    were logged). Segments may train on different examples: the columns are the union of their
    ids, in order of first appearance. damping: relative to each segment's mean Fisher
    eigenvalue (absolute with `absolute_damping`; its old name `damping_absolute` warns).
    horizons / examples: per-segment η·K and N,
    overriding the meta. `.meta["schedule"]` lists what was used for each segment.
    """
    absolute_damping = bool(
        renamed(
            "damping_absolute", "absolute_damping", damping_absolute, absolute_damping, "stagewise_scores"
        )
    )
    store = open_any(store)
    names = list(store.segments) if segments is None else list(segments)
    if not names:
        raise ValueError("no segments to combine: log some, or pass segments=[...]")
    if len(set(names)) != len(names):
        raise ValueError(f"segments lists a segment twice: {names}")
    for extra in (horizons or {}, examples or {}):
        unknown = sorted(set(extra) - set(names))
        if unknown:
            raise ValueError(f"horizons/examples name segments that are not combined: {unknown}")
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (it keeps H_ℓ⁻¹ finite), got {damping}")
    _check_queries(store, queries)
    views = [store.select(n) for n in names]
    schedule = [
        segment_schedule(v, (horizons or {}).get(n), (examples or {}).get(n)) for n, v in zip(names, views)
    ]
    device = (
        torch.device(device)
        if device is not None
        else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    )
    for v in views:
        if len(v) == 0:
            raise StoreError(f"segment {v.segment!r} has no rows; drop it from segments=[...]")

    # Query side, last segment first: carry = Q S_L ⋯ S_{ℓ+1}; Q_ℓ = carry r_ℓ / N_ℓ.
    carry = queries.values.to(device, torch.float64)
    per_segment: list[torch.Tensor | None] = [None] * len(views)
    selected = selected_modules(store, modules)
    for i in reversed(range(len(views))):
        pre = build_preconditioner(
            views[i],
            "raw",
            damping,
            absolute_damping=absolute_damping,
            form="eigen",
            modules=selected,
            device=device,
            chunk_rows=chunk_rows,
            progress=progress,
        )
        h, n = schedule[i].horizon, schedule[i].examples
        per_segment[i] = spectral_apply(carry, pre, lambda e, h=h: -torch.expm1(-h * e) / e) / n
        if i > 0:
            carry = spectral_apply(carry, pre, lambda e, h=h: torch.exp(-h * e))

    # Train side: stream each segment's rows once, add its columns into the union.
    train_ids, position = union_ids(views)
    total = torch.zeros(carry.shape[0], len(train_ids), dtype=torch.float64)
    for view, q_seg in zip(views, per_segment):
        engine = InfluenceEngine(
            view,
            "identity",
            modules=selected,
            device=device,
            chunk_bytes=4 * chunk_rows * view.width,
            progress=progress,
        )
        result = engine.scores(q_seg.to(torch.float32))
        columns = torch.tensor([position[t] for t in result.train_ids], dtype=torch.long)
        total[:, columns] += result.values.to(torch.float64)
    meta = {
        "method": "source",
        "segments": names,
        "damping": damping,
        "absolute_damping": absolute_damping,
        "modules": selected,
        "schedule": {
            s.name: {
                "lr": s.lr,
                "steps": s.steps,
                "horizon": s.horizon,
                "examples": s.examples,
                "steps_from": s.steps_from,
            }
            for s in schedule
        },
    }
    return Scores(total.to(torch.float32), list(queries.data_ids), train_ids, "dot", None, meta)


def _check_queries(store, queries: Gradients) -> None:
    if not isinstance(queries, Gradients):
        raise TypeError(
            f"queries must be logix Gradients (run.gradients()) captured at the final "
            f"model, got {type(queries).__name__}"
        )
    if queries.fingerprint != store.fingerprint or list(queries.modules) != list(store.modules):
        raise StoreError(
            f"the query gradients were captured with other projections or another "
            f"model than the store's: capture them with "
            f"logix.init({os.fspath(store.path)!r}, mode='query') on the final model"
        )
    if len(queries) == 0:
        raise ValueError("no query rows: capture at least one query example")
