"""The automatic check of the loop's loss reduction on the first block: silent on correct loops
(MLP cross-entropy mean, sum under loss_reduction: sum, LM per-example sums and means, a
GradScaler-style scale undone with scale_rows), a warning naming the fix on a sum under `mean`,
a mean under `sum`, a token mean and a constant factor, attributed to the user's line; a notice
when no watched output is a cross-entropy head; off with capture.check_loss: false. The weights
it reads off the gradients are checked against the known weights of each loss."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix import losses
from logix.capture.loss_probe import LossCheckNotice, LossReductionWarning, position_weights


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 7, d: int = 5):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.tok(ids))))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 2, 1, 1, 0])
IDS = torch.randint(1, 7, (3, 6), generator=torch.Generator().manual_seed(2))
MASK = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])  # unequal lengths


def caught(tmp_path, loss_of, model, config=None, mask=None, blocks=2, inside=None):
    """The logix warnings of `blocks` blocks of a logging run whose loss is loss_of(model)."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with logix.init(tmp_path / "s", config=config or {}) as run:
            run.watch(model)
            for b in range(blocks):
                with run(
                    data_id=list(range(b * 10, b * 10 + len(mask if mask is not None else X))), mask=mask
                ) as blk:
                    loss_of(model, run).backward()
                    if inside is not None:
                        inside(blk)
    return [w for w in got if issubclass(w.category, (LossReductionWarning, LossCheckNotice))]


def ce(reduction):
    return lambda m, run: F.cross_entropy(m(X), Y, reduction=reduction)


def lm_per_example(per):
    return lambda m, run: losses.batch_loss(losses.next_token_loss(m(IDS), IDS, MASK, per_example=per), run)


def lm_token_mean(m, run):
    logits = m(IDS)[:, :-1]
    targets = IDS[:, 1:].masked_fill(MASK[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=-100)


def test_position_weights_read_the_known_weight_of_each_position():
    z = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.tensor([[0, 4, 2], [1, 1, 3]])
    w = torch.tensor([[0.5, 2.0, 0.0], [1e-3, 7.0, 3.0]])
    (w * F.cross_entropy(z.transpose(1, 2), y, reduction="none")).sum().backward()
    got, fits = position_weights(z.detach(), z.grad)
    assert fits.tolist() == [[True, True, False], [True, True, True]]
    assert torch.allclose(got.float(), w, rtol=1e-5)
    _, fits = position_weights(z.detach(), torch.randn(2, 3, 5))  # no cross-entropy gradient
    assert not fits.any()


@pytest.mark.parametrize(
    "loss_of, config, mask",
    [
        (ce("mean"), {}, None),
        (ce("sum"), {"capture": {"loss_reduction": "sum"}}, None),
        (lm_per_example("sum"), {}, MASK),
        (lm_per_example("mean"), {}, MASK),
        (lm_per_example("mean"), {"capture": {"loss_reduction": "sum"}}, MASK),
    ],
    ids=["mlp-mean", "mlp-sum", "lm-sum-mean", "lm-mean-mean", "lm-mean-sum"],
)
def test_correct_loops_are_silent(tmp_path, loss_of, config, mask):
    model = TinyLM() if mask is not None else mlp()
    assert caught(tmp_path, loss_of, model, config, mask) == []


def test_a_sum_under_mean_warns_once_at_the_users_line_naming_the_fix(tmp_path):
    got = caught(tmp_path, ce("sum"), mlp())
    assert len(got) == 1 and got[0].category is LossReductionWarning
    text = str(got[0].message)
    assert "sum over the batch" in text and "5x too larger" not in text and "5x too large" in text
    assert "capture.loss_reduction: sum" in text and "capture.check_loss: false" in text
    assert got[0].filename == __file__  # the user's `with run(...)`, not logix internals


def test_a_mean_under_sum_and_a_constant_factor_warn(tmp_path):
    got = caught(tmp_path / "a", ce("mean"), mlp(), {"capture": {"loss_reduction": "sum"}})
    assert len(got) == 1 and "5x too smaller" not in str(got[0].message)
    assert "capture.loss_reduction: mean" in str(got[0].message)
    accumulated = lambda m, run: F.cross_entropy(m(X), Y) / 4  # noqa: E731  (1/accumulation steps)
    got = caught(tmp_path / "b", accumulated, mlp())
    assert (
        len(got) == 1 and "0.25 x the mean" in str(got[0].message) and "scale_rows(4)" in str(got[0].message)
    )


def test_a_loss_scale_undone_with_scale_rows_is_silent(tmp_path):
    scaled = lambda m, run: F.cross_entropy(m(X), Y) * 1024.0  # noqa: E731  (GradScaler-like)
    assert caught(tmp_path, scaled, mlp(), inside=lambda blk: blk.scale_rows(1 / 1024.0)) == []


def test_a_token_mean_over_the_batch_warns(tmp_path):
    got = caught(tmp_path, lm_token_mean, TinyLM(), mask=MASK)
    assert len(got) == 1 and got[0].category is LossReductionWarning
    assert "mean over every target token of the batch (9 tokens)" in str(got[0].message)
    assert "next_token_loss" in str(got[0].message)


def test_off_with_the_config_key(tmp_path):
    off = {"capture": {"check_loss": False}}
    assert caught(tmp_path / "a", ce("sum"), mlp(), off) == []
    assert caught(tmp_path / "b", lm_token_mean, TinyLM(), off, MASK) == []


def test_a_loss_it_cannot_read_is_said_once(tmp_path):
    mse = lambda m, run: (m(X) ** 2).sum(1).mean()  # noqa: E731
    got = caught(tmp_path, mse, mlp(), blocks=3)
    assert len(got) == 1 and got[0].category is LossCheckNotice
    assert "could not check" in str(got[0].message) and "check_batch_reduction" in str(got[0].message)


def test_the_check_changes_no_gradient(tmp_path):
    grads = []
    for check in (True, False):
        model = mlp()
        caught(tmp_path / str(check), ce("sum"), model, {"capture": {"check_loss": check}}, blocks=1)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("reduction, fires", [("mean", False), ("sum", True)])
def test_under_bf16_autocast(tmp_path, reduction, fires):
    def loss_of(m, run):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lm_per_example("mean")(m, run) * (len(IDS) if reduction == "sum" else 1)

    got = caught(tmp_path, loss_of, TinyLM(), mask=MASK)
    assert [w.category for w in got] == ([LossReductionWarning] if fires else [])


def test_long_sequences_are_read_at_sampled_positions(tmp_path):
    """40 positions per sequence (more than the 16 sampled): token mean warns, per-example mean
    is silent, per-token weights are said to be unreadable."""
    ids = torch.randint(1, 7, (3, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 30:], mask[2, 9:] = 0, 0
    per = lambda m, run: losses.batch_loss(losses.next_token_loss(m(ids), ids, mask, "mean"), run)  # noqa: E731

    def token_mean(m, run):
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(m(ids)[:, :-1].reshape(-1, 7), targets.reshape(-1), ignore_index=-100)

    def per_token_weights(m, run):
        ce = F.cross_entropy(m(ids)[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return (ce * torch.linspace(0.5, 1.5, 39) * mask[:, 1:]).sum(1).mean()

    assert caught(tmp_path / "a", per, TinyLM(), mask=mask) == []
    got = caught(tmp_path / "b", token_mean, TinyLM(), mask=mask)
    assert len(got) == 1 and "(76 tokens)" in str(got[0].message)
    got = caught(tmp_path / "c", per_token_weights, TinyLM(), mask=mask)
    assert len(got) == 1 and got[0].category is LossCheckNotice and "per-token weights" in str(got[0].message)
