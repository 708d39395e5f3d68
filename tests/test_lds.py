"""LDS: Spearman with ties, known-answer LDS cases, the subset sampler, resumable retraining."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from logix.eval import bootstrap_ci, lds, rankdata, retrain_outputs, sample_subsets, spearman


# ------------------------------------------------------------------------------ ranks, Spearman
def test_rankdata_averages_ties():
    assert rankdata(torch.tensor([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rankdata(torch.tensor([3.0, 3.0, 3.0])).tolist() == [2.0, 2.0, 2.0]
    assert rankdata(torch.tensor([0.5, -1.0, 7.0, 0.5, 0.5])).tolist() == [3.0, 1.0, 5.0, 3.0, 3.0]


def test_spearman_hand_computed_with_ties():
    # ranks a = [1, 2.5, 2.5, 4, 5], ranks b = [2, 1, 3.5, 3.5, 5]; both centred at 3:
    # Σ da·db = 2 + 1 - 0.25 + 0.5 + 4 = 7.25, Σ da² = Σ db² = 9.5  →  ρ = 7.25 / 9.5 = 29/38
    a = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    b = torch.tensor([2.0, 1.0, 4.0, 4.0, 6.0])
    assert float(spearman(a, b)) == pytest.approx(29 / 38, abs=1e-12)
    assert float(spearman(b, a)) == pytest.approx(29 / 38, abs=1e-12)


def test_spearman_columns_and_undefined():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 4, generator=g)
    b = torch.stack([a[:, 0] ** 3, -a[:, 1], torch.randn(30, generator=g), torch.ones(30)], dim=1)
    rho = spearman(a, b)
    assert rho.shape == (4,)
    assert rho[0] == pytest.approx(1.0)  # a monotone transform keeps the ranks
    assert rho[1] == pytest.approx(-1.0)
    assert abs(float(rho[2])) < 0.5
    assert math.isnan(float(rho[3]))  # constant column: undefined
    with pytest.raises(ValueError):
        spearman(a, b[:, :3])


# ------------------------------------------------------------------------------ LDS known answers
def _case(n_test=20, n_train=50, m=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_test, n_train, generator=g)
    subsets = sample_subsets(n_train, m, alpha=0.5, seed=seed)
    predicted = subsets.double() @ scores.double().T  # [M, n_test]
    return scores, subsets, predicted, g


def test_lds_is_one_when_loss_falls_linearly_with_the_summed_help():
    scores, subsets, predicted, _ = _case()
    loss = 3.0 - 0.5 * predicted  # more help → lower loss
    r = lds(scores, subsets, loss, output="loss")
    assert r.mean == pytest.approx(1.0)
    assert r.n_valid == 20 and r.n_subsets == 60 and r.per_test.shape == (20,)
    assert r.ci_low == pytest.approx(1.0) and r.ci_high == pytest.approx(1.0)
    # the same numbers read as a score that grows with help are perfectly wrong
    assert lds(scores, subsets, loss, output="score").mean == pytest.approx(-1.0)
    # and a monotone (non-linear) output is still a perfect rank prediction
    assert lds(scores, subsets, torch.exp(predicted / 10), output="score").mean == pytest.approx(1.0)


def test_lds_is_minus_one_for_reversed_scores():
    scores, subsets, predicted, _ = _case()
    assert lds(-scores, subsets, -predicted, output="loss").mean == pytest.approx(-1.0)


def test_lds_is_near_zero_for_independent_outputs():
    scores, subsets, _, g = _case(n_test=50, m=200)
    noise = torch.randn(200, 50, generator=g)
    r = lds(scores, subsets, noise)
    assert abs(r.mean) < 0.05
    assert r.ci_low < 0.0 < r.ci_high
    assert r.ci_high - r.ci_low < 0.1


def test_lds_partial_signal_and_numpy_inputs():
    scores, subsets, predicted, g = _case(n_test=30, m=100)
    noisy = -predicted + 3.0 * predicted.std() * torch.randn(
        predicted.shape, generator=g, dtype=torch.float64
    )
    r = lds(scores.numpy(), subsets.numpy(), noisy.numpy())
    assert 0.1 < r.mean < 0.6
    assert r.ci_low < r.mean < r.ci_high
    assert str(r).startswith(f"{r.mean:.3f} [")


def test_lds_skips_undefined_test_examples_and_checks_shapes():
    scores, subsets, predicted, _ = _case(n_test=5)
    out = -predicted.clone()
    out[:, 2] = 1.0  # a test example whose output never changes
    r = lds(scores, subsets, out, output="score")
    assert r.n_valid == 4 and math.isnan(float(r.per_test[2]))
    assert r.mean == pytest.approx(-1.0)  # output="score" on -predicted: -1 on the rest
    with pytest.raises(ValueError, match="outputs must be"):
        lds(scores, subsets, out.T)
    with pytest.raises(ValueError, match="output must be"):
        lds(scores, subsets, out, output="margin")
    with pytest.raises(ValueError, match="training examples"):
        lds(scores[:, :-1], subsets, out)


def test_bootstrap_ci_is_seeded():
    v = torch.linspace(-1, 1, 41)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    low, high = bootstrap_ci(v)
    assert low < 0.0 < high


# ------------------------------------------------------------------------------ subsets
@pytest.mark.parametrize("n, alpha", [(100, 0.5), (11, 0.5), (1397, 0.5), (10, 0.3)])
def test_subset_sizes(n, alpha):
    s = sample_subsets(n, 7, alpha=alpha, seed=1)
    assert s.dtype == torch.bool and s.shape == (7, n)
    assert (s.sum(dim=1) == int(round(alpha * n))).all()


def test_subsets_are_reproducible_and_seeded():
    a = sample_subsets(200, 10, seed=5)
    assert torch.equal(a, sample_subsets(200, 10, seed=5))
    assert not torch.equal(a, sample_subsets(200, 10, seed=6))
    assert torch.equal(a, sample_subsets(200, 25, seed=5)[:10])  # more subsets extend, not reshuffle
    assert len({tuple(r.tolist()) for r in a}) == 10  # distinct rows
    # every example is in roughly half of many subsets
    freq = sample_subsets(200, 400, seed=0).float().mean(dim=0)
    assert 0.35 < float(freq.min()) and float(freq.max()) < 0.65


@pytest.mark.parametrize("args", [(0, 3), (10, 0), (10, 3, 0.0), (10, 3, 1.0), (3, 2, 0.1)])
def test_subset_arguments_are_checked(args):
    with pytest.raises(ValueError):
        sample_subsets(*args)


# ------------------------------------------------------------------------------ retraining
class CountingTrainer:
    """A fake train_fn: output = (mean member index + seed) for each of 3 test examples."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[tuple[int, ...], int]] = []
        self.fail_at = fail_at

    def __call__(self, members: torch.Tensor, seed: int) -> torch.Tensor:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("killed")
        assert members.dtype == torch.int64
        self.calls.append((tuple(members.tolist()), seed))
        base = members.double().mean() + seed
        return torch.stack([base, 2 * base, -base])


def test_retrain_outputs_averages_seeds_and_passes_members():
    subsets = sample_subsets(20, 4, seed=0)
    fn = CountingTrainer()
    out = retrain_outputs(fn, subsets, progress=False, seeds=(0, 2))
    assert out.shape == (4, 3) and out.dtype == torch.float32
    assert len(fn.calls) == 8
    for j in range(4):
        members = subsets[j].nonzero().flatten()
        assert fn.calls[2 * j] == (tuple(members.tolist()), 0)
        expected = float(members.double().mean()) + 1.0  # mean over seeds 0 and 2
        assert out[j].tolist() == pytest.approx([expected, 2 * expected, -expected])


def test_retrain_outputs_resumes_without_retraining(tmp_path):
    subsets = sample_subsets(30, 6, seed=0)
    first = CountingTrainer()
    a = retrain_outputs(first, subsets, out_dir=tmp_path, progress=True)
    assert len(first.calls) == 6
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"subset-{j:05d}.safetensors" for j in range(6)]
    with safe_open(str(tmp_path / files[0]), framework="pt") as f:  # safetensors, not pickle
        assert set(f.keys()) == {"members", "output"}

    again = CountingTrainer()
    assert torch.equal(retrain_outputs(again, subsets, out_dir=tmp_path, progress=False), a)
    assert again.calls == []

    (tmp_path / files[3]).unlink()
    one = CountingTrainer()
    assert torch.equal(retrain_outputs(one, subsets, out_dir=tmp_path, progress=False), a)
    assert len(one.calls) == 1 and one.calls[0][0] == tuple(subsets[3].nonzero().flatten().tolist())


def test_retrain_outputs_resumes_after_an_interruption(tmp_path):
    subsets = sample_subsets(30, 5, seed=1)
    with pytest.raises(KeyboardInterrupt):
        retrain_outputs(CountingTrainer(fail_at=2), subsets, out_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("subset-*.safetensors"))) == 2
    assert not list(tmp_path.glob(".*tmp*"))
    rest = CountingTrainer()
    out = retrain_outputs(rest, subsets, out_dir=tmp_path, progress=False)
    assert len(rest.calls) == 3
    assert torch.equal(out, retrain_outputs(CountingTrainer(), subsets, progress=False))


def test_retrain_outputs_rejects_a_stale_cache(tmp_path):
    retrain_outputs(CountingTrainer(), sample_subsets(30, 3, seed=0), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different subset or seeds"):
        retrain_outputs(CountingTrainer(), sample_subsets(30, 3, seed=1), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different subset or seeds"):
        retrain_outputs(
            CountingTrainer(), sample_subsets(30, 3, seed=0), out_dir=tmp_path, progress=False, seeds=(1,)
        )


def test_retrain_outputs_checks_output_lengths():
    subsets = sample_subsets(10, 3, seed=0)
    lengths = iter([3, 3, 4])
    with pytest.raises(ValueError, match="different lengths"):
        retrain_outputs(lambda m, s: torch.zeros(next(lengths)), subsets, progress=False)


def test_end_to_end_with_numpy_outputs():
    # train_fn may return numpy; the exact additive model gives LDS 1
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 40, generator=g)
    subsets = sample_subsets(40, 20, seed=0)

    def train_fn(members, seed):
        return -(scores[:, members].sum(dim=1)).numpy().astype(np.float64)

    outputs = retrain_outputs(train_fn, subsets, progress=False)
    assert lds(scores, subsets, outputs, output="loss").mean == pytest.approx(1.0)
