"""Exact attribution through a recorded training: metagradients by replay (`logix.unroll`).

Training with a weight εᵢ on every example's loss is a map ε ↦ θ_T: θ_{t+1}, s_{t+1} =
U(θ_t, s_t, ∇_θ L_t(θ_t, ε)), L_t the step's loss Σ_{i∈B_t} εᵢ ℓᵢ(θ_t) (/|B_t| for 'mean').
For a measurement f_q(θ_T) the adjoints λ_t = ∂f_q/∂θ_t, μ_t = ∂f_q/∂s_t run backwards:

    (λ_t, μ_t, ∂f_q/∂ε) += VJP of (θ, s, ε) ↦ U(θ, s, ∇_θ L_t(θ, ε)) at (θ_t, s_t, 1) on (λ_{t+1}, μ_{t+1})

one double backward per step (the Hessian-vector product), batched over queries with
`torch.func.vmap`. Its ε part is wᵢ⟨∇ℓᵢ(θ_t), v⟩ for the step's gradient cotangent v, read off
the double backward without forming any per-example gradient. The states θ_t, s_t are
recomputed forwards from the checkpoint that opens each interval, and every replayed interval
must land on the next recorded checkpoint (else the model, loss_fn or data differ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import vjp, vmap

from logix.capture.trajectory import optimizer_kind
from logix.errors import StoreError
from logix.query.results import Scores
from logix.store.trajectory import Checkpoint, Trajectory
from logix.store.writer import normalise_ids
from logix.unroll.clipping import clip_by_global_norm, recorded_max_norm
from logix.unroll.losses import LossFn, ParametrisedLoss, check_model
from logix.unroll.optimizers import FunctionalOptimizer

Examples = Callable[[list], Any]


def _state_of(ckpt: Checkpoint, names: list[str], keys: tuple[str, ...], params: tuple[torch.Tensor, ...]):
    """The checkpoint's optimizer state in the trajectory's parameter order (zeros where the
    state does not exist yet), with the Python-side counts and 'initialised' flags."""
    state = {
        k: tuple(ckpt.state.get(k, {}).get(n, torch.zeros_like(p)).to(p.dtype) for n, p in zip(names, params))
        for k in keys
    }
    counts = [ckpt.counts.get(n, 0) for n in names]
    init = [n in set(ckpt.initialised) for n in names]
    return state, counts, init


def _train_ids(steps: list[dict], given: Sequence | None) -> list:
    if given is not None:
        return normalise_ids(list(given))
    seen = dict.fromkeys(i for s in steps for b in s["blocks"] for i in b)
    try:
        return sorted(seen)
    except TypeError:  # ints mixed with strings: order of first appearance
        return list(seen)


def _check_optimizer(optimizer: torch.optim.Optimizer | None, model: nn.Module, traj: Trajectory) -> None:
    if optimizer is None:
        return
    kind = optimizer_kind(optimizer)
    if kind != traj.optimizer:
        raise StoreError(
            f"the trajectory was recorded with {traj.optimizer!r}, not {kind!r}: replay "
            "reproduces the recorded optimizer; pass that one (or none)"
        )
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = [
        (name_of.get(id(p)), g) for g, group in enumerate(optimizer.param_groups) for p in group["params"]
    ]
    if groups != [(p["name"], p["group"]) for p in traj.parameters]:
        raise StoreError(
            "the optimizer's parameter groups differ from the recorded ones: replay with the "
            "optimizer (and model) the trajectory was recorded with"
        )


def _max_relative_gap(
    a: tuple[torch.Tensor, ...], b: dict[str, torch.Tensor], names: list[str]
) -> tuple[float, str]:
    gaps = [
        (float((x - b[n].to(x.dtype)).abs().max() / b[n].abs().max().clamp(min=1e-30)), n)
        for x, n in zip(a, names)
    ]
    return max(gaps)


def unroll(
    run_dir: str | Path,
    model: nn.Module,
    loss_fn: LossFn,
    examples: Examples,
    queries: tuple[Sequence, Any],
    *,
    measure: LossFn | None = None,
    from_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    train_ids: Sequence | None = None,
    query_chunk: int | None = None,
    tolerance: float = 1e-3,
    progress: bool = True,
) -> Scores:
    """Scores [n_query, n_train]: −∂f_q(θ_T)/∂εᵢ for every training example i, summed over the
    recorded steps ≥ `from_step` (a checkpoint) in which i appeared; positive = i helps q.

    loss_fn(model, batch) -> [B]: the per-example losses the training loop reduced (with the
    recorded reduction); examples(ids) -> the batch of those ids, as the loop saw it. queries:
    (query_ids, batch); the measurement f is measure(model, batch) -> [n_query] (default loss_fn)
    at the final weights. from_step > 0: the segment-wise variant (only the last steps, from a
    checkpoint). query_chunk bounds how many adjoints are vmapped at once. tolerance: the largest
    relative gap allowed between a replayed interval's end and the recorded checkpoint.
    """
    traj = Trajectory(run_dir)
    names = [p["name"] for p in traj.parameters]
    check_model(model, traj.parameters)
    _check_optimizer(optimizer, model, traj)
    steps = traj.steps()
    end = traj.n_steps
    checkpoints = [c for c in traj.checkpoint_steps if c <= end]
    if from_step not in checkpoints:
        raise StoreError(f"from_step={from_step} is not a recorded checkpoint; choose one of {checkpoints}")
    opt = FunctionalOptimizer(traj.optimizer)
    loss = ParametrisedLoss(model, names)
    measure = measure or loss_fn
    query_ids, query_batch = normalise_ids(list(queries[0])), queries[1]
    columns = {i: j for j, i in enumerate(_train_ids(steps[from_step:], train_ids))}
    groups = [p["group"] for p in traj.parameters]

    final = traj.checkpoint(end)
    theta = tuple(final.params[n] for n in names)
    values, pull = vjp(lambda p: loss.per_example(p, measure, query_batch), theta)
    if values.shape != (len(query_ids),):
        raise StoreError(
            f"measure(model, batch) gave {tuple(values.shape)} values for {len(query_ids)} query ids"
        )
    eye = torch.eye(len(query_ids), dtype=values.dtype)
    lam = vmap(pull, chunk_size=query_chunk)(eye)[0]  # [Q, ...] per parameter
    mu = {k: tuple(torch.zeros_like(x) for x in lam) for k in opt.state_keys}
    scores = torch.zeros(len(query_ids), len(columns), dtype=values.dtype)

    def batches_of(t: int) -> tuple[list, tuple[torch.Tensor, ...], list, list, float | None]:
        record = steps[t]
        blocks = [normalise_ids(b) for b in record["blocks"]]
        hps = [record["groups"][g] for g in groups]
        ones = tuple(torch.ones(len(b), dtype=values.dtype) for b in blocks)
        return [examples(b) for b in blocks], ones, hps, blocks, recorded_max_norm(record, t)

    def update(p, s, w, batches, hps, counts, init, clip):
        g = torch.func.grad(loss.step_loss)(p, w, loss_fn, batches, traj.reduction)
        if clip is not None:  # the recorded loop called clip_grad_norm_ before this step
            g = clip_by_global_norm(g, clip)
        return opt.step(p, s, g, hps, counts, init)

    bar = _progress(progress, end - from_step)
    starts = [c for c in checkpoints if from_step <= c < end]
    for start in reversed(starts):
        stop = checkpoints[checkpoints.index(start) + 1]
        ckpt = traj.checkpoint(start)
        p = tuple(ckpt.params[n] for n in names)
        s, counts, init = _state_of(ckpt, names, opt.state_keys, p)
        trail = []
        for t in range(start, stop):  # forward recomputation of the interval's states
            batches, ones, hps, _, clip = batches_of(t)
            trail.append((p, s, counts, init))
            p, s = update(p, s, ones, batches, hps, counts, init, clip)
            counts, init = opt.advance(hps, counts, init)
        gap, where = _max_relative_gap(p, traj.checkpoint(stop).params, names)
        if not gap <= tolerance:
            raise StoreError(
                f"the replay does not reproduce the recorded training: after steps "
                f"{start}..{stop - 1} parameter {where} differs from the recorded checkpoint "
                f"by {gap:.2e} (relative). Replay with the recorded model, and the loss_fn "
                "and examples(ids) of the training loop"
            )
        for t in range(stop - 1, start - 1, -1):  # the adjoint, backwards through the interval
            batches, ones, hps, blocks, clip = batches_of(t)
            p, s, counts, init = trail[t - start]
            step = lambda p_, s_, w_, b=batches, h=hps, c=counts, i=init, k=clip: (  # noqa: E731
                update(p_, s_, w_, b, h, c, i, k)
            )
            _, pull = vjp(step, p, s, ones)
            lam, mu, d_w = vmap(pull, chunk_size=query_chunk)((lam, mu))
            for ids, d in zip(blocks, d_w):
                cols = [columns.get(i) for i in ids]
                keep = [k for k, c in enumerate(cols) if c is not None]
                scores.index_add_(1, torch.tensor([cols[k] for k in keep], dtype=torch.long), -d[:, keep])
            bar.advance()
    bar.close()
    meta = {
        "method": "unroll",
        "from_step": from_step,
        "steps": end - from_step,
        "optimizer": traj.optimizer,
        "measurement": "measure" if measure is not loss_fn else "loss_fn",
    }
    return Scores(scores, query_ids, list(columns), mode="unroll", meta=meta)


class _progress:
    """A rich progress bar over the replayed steps (or nothing)."""

    def __init__(self, show: bool, total: int):
        self._bar = None
        if show and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("unroll: adjoint"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
            self._task = self._bar.add_task("unroll", total=total)
            self._bar.start()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
