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
from dataclasses import dataclass
from typing import Any

import torch

from logix.query.engine import InfluenceEngine
from logix.query.queries import checked_queries
from logix.query.results import Scores
from logix.query.segments import open_any, union_ids
from logix.store.gradients import Gradients


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


def stagewise_scores(
    store,
    queries: Gradients | torch.Tensor,
    segments: list[str] | None = None,
    *,
    damping: float | None = None,
    absolute_damping: bool = False,
    horizons: dict[str, float] | None = None,
    examples: dict[str, int] | None = None,
    **engine_options: Any,
) -> Scores:
    """SOURCE scores of every training example on the queries: `.values` [n_query, n_train].

    store: a `Store` or a run directory; queries: gradients at the *final* model (captured with
    the store's projections); segments: names in training order (default: all, in the order they
    were logged). Segments may train on different examples: the columns are the union of their
    ids, in order of first appearance. damping: relative to each segment's mean Fisher
    eigenvalue (absolute with `absolute_damping`); default the store's `query:` config.
    horizons / examples: per-segment η·K and N, overriding the meta. engine_options: those of
    `InfluenceEngine` other than the preconditioner (modules, device, chunk_bytes, fisher,
    progress, quiet): each segment is one engine with the `raw` preconditioner in eigen form,
    which checks the queries, picks the device and applies f(F + λI).
    `.meta["schedule"]` lists what was used for each segment.
    """
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
    values, query_ids = checked_queries(queries, store)  # before any curvature is built
    views = [store.select(n) for n in names]
    schedule = [
        segment_schedule(v, (horizons or {}).get(n), (examples or {}).get(n)) for n, v in zip(names, views)
    ]
    engines = [
        InfluenceEngine(
            v, "raw", damping, absolute_damping=absolute_damping, form="eigen", mode="dot", **engine_options
        )
        for v in views
    ]

    # Query side, last segment first: carry = Q S_L ⋯ S_{ℓ+1}; Q_ℓ = carry r_ℓ / N_ℓ.
    carry = values.to(engines[-1].device, torch.float64)
    per_segment: list[torch.Tensor | None] = [None] * len(views)
    for i in reversed(range(len(views))):
        pre = engines[i].preconditioner
        h, n = schedule[i].horizon, schedule[i].examples
        per_segment[i] = pre.spectral(carry, lambda e, h=h: -torch.expm1(-h * e) / e) / n
        if i > 0:
            carry = pre.spectral(carry, lambda e, h=h: torch.exp(-h * e))

    # Train side: stream each segment's rows once, add its columns into the union.
    train_ids, position = union_ids(views)
    total = torch.zeros(carry.shape[0], len(train_ids), dtype=torch.float64)
    for engine, q_seg in zip(engines, per_segment):
        result = engine.scores(q_seg.to(torch.float32), prepared=True)
        columns = torch.tensor([position[t] for t in result.train_ids], dtype=torch.long)
        total[:, columns] += result.values.to(torch.float64)
    meta = {
        "method": "source",
        "segments": names,
        "damping": engines[0].damping,
        "absolute_damping": absolute_damping,
        "fisher": engines[0].fisher,
        "modules": engines[0].modules,
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
    return Scores(total.to(torch.float32), query_ids, train_ids, "dot", None, meta)
