"""Single-model LDS: drop subsets, the retraining call (same seed), and the score itself."""

from __future__ import annotations

import pytest
import torch

from logix.eval import drop_subsets, lds, single_model_lds


def test_drop_subsets_keep_the_rest():
    kept = drop_subsets(200, 5, 0.05, seed=1)
    assert kept.shape == (5, 200) and kept.dtype == torch.bool
    assert (kept.sum(1) == 190).all()
    assert torch.equal(kept, drop_subsets(200, 5, 0.05, seed=1))
    with pytest.raises(ValueError, match="drop fraction"):
        drop_subsets(200, 5, 1.0)


def test_single_model_lds_of_an_additive_model(tmp_path):
    """A 'training' whose test loss is exactly additive in the kept examples: the true effects
    score LDS 1 at every drop fraction, negated effects −1; retraining uses the given seed only."""
    gen = torch.Generator().manual_seed(0)
    effects = torch.randn(3, 50, generator=gen, dtype=torch.float64)  # how much example i helps test q
    seen = []

    def train_fn(kept_idx: torch.Tensor, seed: int) -> torch.Tensor:
        seen.append(seed)
        return 10.0 - effects[:, kept_idx].sum(1)

    res = single_model_lds(
        effects, train_fn, 50, fractions=(0.02, 0.5), n_subsets=20, seed=7, out_dir=tmp_path
    )
    assert set(res) == {0.02, 0.5} and set(seen) == {7}
    for r in res.values():
        assert r.mean == pytest.approx(1.0) and r.n_subsets == 20
    calls = len(seen)
    again = single_model_lds(
        -effects, train_fn, 50, fractions=(0.02, 0.5), n_subsets=20, seed=7, out_dir=tmp_path
    )
    assert len(seen) == calls  # cached: nothing retrained
    assert all(r.mean == pytest.approx(-1.0) for r in again.values())
    kept = drop_subsets(50, 20, 0.5)
    outputs = torch.stack([10.0 - effects[:, k].sum(1) for k in kept])
    assert lds(effects, kept, outputs).mean == pytest.approx(1.0)
