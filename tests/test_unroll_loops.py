"""Training loops people run, in trajectory recording and replay: gradient clipping by global norm
(clip_grad_norm_ between backward and step) replayed exactly, against finite differences of the
whole clipped training and torch.func of a hand-written clipped loop; what replay cannot
reproduce (GradScaler, autocast, bf16 weights, clip_grad_value_, clipping a subset, edited or
non-finite gradients) refused at record time with an error naming what is supported."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev
from unroll_helpers import OPTIMIZERS, STEPS, N, data, examples, loss_fn, make_model, queries, query_losses

import logix
from logix.store.trajectory import trajectory_dir

MAX_NORM = 0.8  # between the smallest and largest step gradient norms of this training


def train_clipped(kind, weights=None, record=None, max_norm=MAX_NORM):
    """unroll_helpers.train's loop (StepLR, accumulation) with clip_grad_norm_ before each step."""
    x, y, _, _ = data()
    w = torch.ones(N, dtype=torch.float64) if weights is None else weights
    model = make_model()
    opt = OPTIMIZERS[kind](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    rec = logix.record_trajectory(record, model, opt, every=2, overwrite=True) if record else None
    for blocks in STEPS:
        for ids in blocks:
            if rec:
                rec.add_block(ids)
            (w[ids] * loss_fn(model, (x[ids], y[ids]))).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
        sched.step()
    if rec:
        rec.close()
    return model


def clipped_steps(run_dir) -> list:
    files = sorted((trajectory_dir(run_dir) / "steps").glob("*.json"))
    return [r.get("clip_max_norm") for f in files for r in json.loads(f.read_text())]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_clipping_replays_exactly_against_finite_differences(tmp_path, kind):
    """On four examples (the hand-written SGD loop below checks every column through jacrev)."""
    train_clipped(kind, record=tmp_path / "r")
    recorded = clipped_steps(tmp_path / "r")
    assert None in recorded and MAX_NORM in recorded, recorded  # some steps clipped, some not
    scores = logix.unroll.unroll(tmp_path / "r", make_model(), loss_fn, examples, queries(), progress=False)
    h, cols, picked = 1e-5, [], [0, 5, 8, 11]  # in steps 0-5, clipped and not
    for i in picked:
        e = torch.zeros(N, dtype=torch.float64)
        e[i] = h
        up, down = query_losses(train_clipped(kind, 1 + e)), query_losses(train_clipped(kind, 1 - e))
        cols.append((up - down) / (2 * h))
    fd = torch.stack(cols, dim=1)
    rel = float((-scores.values[:, picked] - fd).norm() / fd.norm())
    assert rel < 1e-6, rel
    unclipped = query_losses(train_clipped(kind, max_norm=1e9))  # clipping changed the training
    assert float((unclipped - query_losses(train_clipped(kind))).abs().max()) > 1e-3


def clipped_sgd_by_hand(eps: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The clipped SGD training written out (momentum 0.9, weight decay 0.01, StepLR)."""
    x, y, xq, yq = data()
    p = {n: t.detach() for n, t in model.named_parameters()}
    buf = {}
    for t, blocks in enumerate(STEPS):

        def step_loss(params, blocks=blocks):
            return sum(
                (
                    eps[b] * F.cross_entropy(functional_call(model, params, (x[b],)), y[b], reduction="none")
                ).mean()
                for b in blocks
            )

        g = grad(step_loss)(p)
        total = torch.sqrt(sum((g[n] ** 2).sum() for n in g))
        coef = torch.clamp(MAX_NORM / (total + 1e-6), max=1.0)
        lr = 0.3 * 0.5 ** (t // 2)
        for n in p:
            d = g[n] * coef + 0.01 * p[n]
            buf[n] = d if t == 0 else 0.9 * buf[n] + d
            p[n] = p[n] - lr * buf[n]
    return F.cross_entropy(functional_call(model, p, (xq,)), yq, reduction="none")


def test_clipping_replay_matches_jacrev_of_a_hand_written_clipped_loop(tmp_path):
    train_clipped("sgd", record=tmp_path / "r")
    scores = logix.unroll.unroll(tmp_path / "r", make_model(), loss_fn, examples, queries(), progress=False)
    ones = torch.ones(N, dtype=torch.float64)
    assert torch.allclose(
        clipped_sgd_by_hand(ones, make_model()), query_losses(train_clipped("sgd")), rtol=1e-12
    )
    reference = jacrev(clipped_sgd_by_hand)(ones, make_model())
    rel = float((-scores.values - reference).norm() / reference.norm())
    assert rel < 1e-9, rel


def one_step(tmp_path, between=None, model=None, scale=1.0, autocast=False):
    """Record one step of a float32 loop; `between(model)` runs between backward and step."""
    model = model or make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, _, _ = data(torch.float32)
    rec = logix.record_trajectory(tmp_path / "t", model, opt, overwrite=True)
    rec.add_block([0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(model, (x[:3], y[:3])).mean()
    (loss * scale).backward()
    if between is not None:
        between(model)
    opt.step()
    rec.close()
    return model, opt


def test_a_plain_float32_step_and_an_unclipped_clip_record_no_clip(tmp_path):
    one_step(tmp_path, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e6))
    assert clipped_steps(tmp_path / "t") == [None]


@pytest.mark.parametrize(
    "between, match",
    [
        (lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 0.01), "clip_grad_value_"),
        (lambda m: torch.nn.utils.clip_grad_norm_(m[2].parameters(), 0.01), "clipping only some parameters"),
        (lambda m: m[0].weight.grad.mul_(2.0), "changed by hand"),
        (lambda m: setattr(m[0].bias, "grad", torch.ones_like(m[0].bias)), "changed by hand"),
    ],
    ids=["clip-value", "clip-subset", "edited", "set-by-hand"],
)
def test_gradients_changed_otherwise_are_refused_at_the_step(tmp_path, between, match):
    with pytest.raises(logix.CaptureError, match=match) as e:
        one_step(tmp_path, between)
    assert "clip_grad_norm_" in str(e.value)  # names what is supported


def test_a_gradient_no_backward_produced_is_refused(tmp_path):
    model = make_model(torch.float32)
    model.extra = nn.Parameter(torch.zeros(2))  # not in the loss: its .grad can only be set by hand
    with pytest.raises(logix.CaptureError, match="not produced by a backward"):
        one_step(tmp_path, lambda m: setattr(m.extra, "grad", torch.ones(2)), model=model)


def test_grad_scaler_and_non_finite_gradients_are_refused(tmp_path):
    model = make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y, _, _ = data(torch.float32)
    rec = logix.record_trajectory(tmp_path / "g", model, opt)
    rec.add_block([0, 1])
    scaler.scale(loss_fn(model, (x[:2], y[:2])).mean()).backward()
    with pytest.raises(logix.CaptureError, match="GradScaler's unscale"):
        scaler.step(opt)
    with pytest.raises(logix.CaptureError, match="non-finite gradients"):
        one_step(tmp_path, scale=float("inf"))


def test_autocast_and_bf16_weights_are_refused_at_record_time(tmp_path):
    with pytest.raises(logix.ConfigError, match="autocast") as e:
        one_step(tmp_path, autocast=True)
    assert "float32" in str(e.value)
    bf16 = make_model(torch.bfloat16)
    with pytest.raises(logix.ConfigError, match="bfloat16 weights"):
        logix.record_trajectory(tmp_path / "b", bf16, torch.optim.SGD(bf16.parameters(), lr=0.1))
    assert not (tmp_path / "b").exists()  # refused before anything is written


def test_a_damaged_clip_record_is_a_clear_error():
    from logix.unroll.clipping import recorded_max_norm

    with pytest.raises(logix.StoreError, match="clip_max_norm"):
        recorded_max_norm({"clip_max_norm": "1.0"}, 3)
    with pytest.raises(logix.StoreError, match="clip_max_norm"):
        recorded_max_norm({"clip_max_norm": -1.0}, 3)
    assert recorded_max_norm({}, 0) is None


def test_recording_a_clipped_run_changes_no_weight_and_replays_through_run_watch(tmp_path):
    plain, recorded = train_clipped("adam"), train_clipped("adam", record=tmp_path / "r")
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), recorded.parameters()))
    x, y, _, _ = data()
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with logix.init(tmp_path / "run", config={"projection": {"kind": "identity"}}) as run:
        run.watch(model, optimizer=opt, trajectory_every=2)
        for t, blocks in enumerate(STEPS):
            for ids in blocks:
                with run(data_id=[t * 100 + i for i in ids]):  # ids unique per store segment
                    loss_fn(model, (x[ids], y[ids])).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            opt.step()
            opt.zero_grad()
            sched.step()
    assert MAX_NORM in clipped_steps(tmp_path / "run")
    logged = logix.unroll.unroll(
        tmp_path / "run",
        make_model(),
        loss_fn,
        lambda ids: examples([i % 100 for i in ids]),
        queries(),
        progress=False,
    )
    train_clipped("sgd", record=tmp_path / "alone")
    alone = logix.unroll.unroll(
        tmp_path / "alone", make_model(), loss_fn, examples, queries(), progress=False
    )
    total = torch.zeros_like(alone.values)
    for j, i in enumerate(logged.train_ids):
        total[:, i % 100] += logged.values[:, j]
    assert torch.allclose(total, alone.values, rtol=1e-10, atol=1e-14)


def test_a_frozen_parameter_in_the_optimizer_keeps_its_clear_error(tmp_path):
    model = make_model()
    model[0].weight.requires_grad_(False)  # no gradient hook can be registered on it
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = logix.record_trajectory(tmp_path / "f", model, opt)
    rec.add_block([0, 1])
    loss_fn(model, examples([0, 1])).mean().backward()
    with pytest.raises(logix.CaptureError, match="0.weight has no gradient"):
        opt.step()
