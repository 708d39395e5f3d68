"""logix.unroll: the replayed metagradient against finite differences of the whole training and
against torch.func differentiation of an independently written unrolled loop (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev
from unroll_helpers import (
    OPTIMIZERS,
    STEPS,
    N,
    data,
    examples,
    loss_fn,
    make_model,
    queries,
    query_losses,
    train,
)

import logix
from logix.query.results import load_result


def replay(tmp_path, kind, every=2, **kwargs):
    train(kind, record=str(tmp_path / kind), every=every)
    return logix.unroll.unroll(
        tmp_path / kind, make_model(), loss_fn, examples, queries(), progress=False, **kwargs
    )


def finite_differences(kind: str, h: float = 1e-5) -> torch.Tensor:
    """∂(query losses)/∂εᵢ [Q, N] by central differences of the whole training."""
    cols = []
    for i in range(N):
        e = torch.zeros(N, dtype=torch.float64)
        e[i] = h
        up, down = query_losses(train(kind, 1 + e)), query_losses(train(kind, 1 - e))
        cols.append((up - down) / (2 * h))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_metagradient_matches_finite_differences(tmp_path, kind):
    scores = replay(tmp_path, kind)
    fd = finite_differences(kind)
    assert scores.values.shape == (4, N) and scores.train_ids == list(range(N))
    rel = float((-scores.values - fd).norm() / fd.norm())
    assert rel < 1e-6, rel
    assert float(fd.abs().min()) > 0  # every example took part in some step


def unrolled_query_losses(eps: torch.Tensor, model, kind: str, first_weighted_step: int = 0) -> torch.Tensor:
    """The training of unroll_helpers.train written out by hand (SGD with momentum and weight
    decay, or AdamW; StepLR halving every 2 steps), as a function of the example weights."""
    x, y, xq, yq = data()
    p = {n: t.detach() for n, t in model.named_parameters()}
    buf = {n: torch.zeros_like(t) for n, t in p.items()}
    sq = {n: torch.zeros_like(t) for n, t in p.items()}
    for t, blocks in enumerate(STEPS):
        w = eps if t >= first_weighted_step else torch.ones_like(eps)

        def step_loss(params, w=w, blocks=blocks):
            return sum(
                (
                    w[b] * F.cross_entropy(functional_call(model, params, (x[b],)), y[b], reduction="none")
                ).mean()
                for b in blocks
            )

        g = grad(step_loss)(p)
        if kind == "sgd":
            lr = 0.3 * 0.5 ** (t // 2)
            for n in p:
                d = g[n] + 0.01 * p[n]
                buf[n] = d if t == 0 else 0.9 * buf[n] + d
                p[n] = p[n] - lr * buf[n]
        else:  # adamw
            lr, (b1, b2) = 0.05 * 0.5 ** (t // 2), (0.85, 0.95)
            for n in p:
                p[n] = p[n] * (1 - lr * 0.1)
                buf[n] = b1 * buf[n] + (1 - b1) * g[n]
                sq[n] = b2 * sq[n] + (1 - b2) * g[n] ** 2
                m_hat, v_hat = buf[n] / (1 - b1 ** (t + 1)), sq[n] / (1 - b2 ** (t + 1))
                p[n] = p[n] - lr * m_hat / (v_hat.sqrt() + 1e-8)
    return F.cross_entropy(functional_call(model, p, (xq,)), yq, reduction="none")


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_metagradient_matches_torch_func_of_the_unrolled_loop(tmp_path, kind):
    scores = replay(tmp_path, kind, every=4)  # checkpoints at 0, 4 and the end (6)
    ones = torch.ones(N, dtype=torch.float64)
    by_hand = unrolled_query_losses(ones, make_model(), kind)
    assert torch.allclose(by_hand, query_losses(train(kind)), rtol=1e-12, atol=0)
    reference = jacrev(unrolled_query_losses)(ones, make_model(), kind)  # [Q, N]
    rel = float((-scores.values - reference).norm() / reference.norm())
    assert rel < 1e-10, rel


def test_segment_wise_replay_from_a_checkpoint(tmp_path):
    """from_step=4: only the last steps' weights, as if fine-tuning started at step 4."""
    scores = replay(tmp_path, "sgd", from_step=4)
    reference = jacrev(unrolled_query_losses)(torch.ones(N, dtype=torch.float64), make_model(), "sgd", 4)
    in_last = sorted({i for blocks in STEPS[4:] for b in blocks for i in b})
    assert scores.train_ids == in_last
    assert torch.allclose(-scores.values, reference[:, in_last], rtol=1e-9, atol=1e-14)
    assert scores.meta["from_step"] == 4 and scores.meta["steps"] == 2
    with pytest.raises(logix.StoreError, match="not a recorded checkpoint"):
        logix.unroll.unroll(
            tmp_path / "sgd", make_model(), loss_fn, examples, queries(), from_step=3, progress=False
        )


def test_many_queries_in_chunks_and_a_custom_measurement(tmp_path):
    whole = replay(tmp_path, "adam")
    chunked = logix.unroll.unroll(
        tmp_path / "adam", make_model(), loss_fn, examples, queries(), query_chunk=1, progress=False
    )
    assert torch.allclose(whole.values, chunked.values, rtol=1e-12, atol=1e-15)
    doubled = logix.unroll.unroll(
        tmp_path / "adam",
        make_model(),
        loss_fn,
        examples,
        queries(),
        progress=False,
        measure=lambda m, b: 2 * loss_fn(m, b),
    )
    assert torch.allclose(doubled.values, 2 * whole.values, rtol=1e-12, atol=1e-15)


def test_scores_save_and_load_like_other_results(tmp_path):
    scores = replay(tmp_path, "sgd")
    back = load_result(scores.save(tmp_path / "unrolled.safetensors"))
    assert torch.equal(back.values, scores.values)
    assert back.train_ids == scores.train_ids and back.query_ids == scores.query_ids
