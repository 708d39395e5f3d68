"""Token-level re-ranking: the re-ranked lists are permutations of the candidates, scored by the
best window of position terms (checked by brute force), and a window covering whole sequences
gives back the store-wide scores."""

from __future__ import annotations

import pytest
import torch
from kfac_helpers import SeqNet, make_batches, seq_loss

import logix
from logix.query.rerank import rerank_top_k


@pytest.fixture()
def setting(tmp_path):
    torch.manual_seed(0)
    model = SeqNet()
    gen = torch.Generator().manual_seed(3)
    batches = make_batches(gen, sizes=(4, 3, 5), seq=6)
    config = {
        "projection": {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 1},
        "capture": {"loss_reduction": "mean"},
    }
    with logix.init(tmp_path / "s", config=config) as run:
        run.watch(model)
        for ids, x, y, mask in batches:
            with run(data_id=ids, mask=mask):
                seq_loss(model(x), y, mask, "mean").backward()
    by_id = {i: (x[j], y[j], mask[j]) for ids, x, y, mask in batches for j, i in enumerate(ids)}

    def recompute(ids):
        q = logix.init(tmp_path / "s", mode="query")
        q.watch(model)
        x, y, mask = (torch.stack([by_id[i][k] for i in ids]) for k in range(3))
        with q(data_id=list(ids), mask=mask, per_token=True):
            seq_loss(model(x), y, mask, "mean").backward()
        return q.token_gradients()

    query = logix.init(tmp_path / "s", mode="query")
    query.watch(model)
    qx = torch.randn(3, 6, 5, generator=gen)
    qy, qmask = torch.randint(0, 3, (3, 6), generator=gen), torch.ones(3, 6, dtype=torch.long)
    with query(data_id=[0, 1, 2], mask=qmask):
        seq_loss(model(qx), qy, qmask, "mean").backward()
    engine = logix.InfluenceEngine(tmp_path / "s", preconditioner="raw", damping=0.1)
    return engine, query.gradients(), recompute


@pytest.mark.parametrize("window", [1, 2, 4])
def test_reranked_lists_are_candidates_with_their_best_window(setting, window):
    engine, q, recompute = setting
    first = engine.top_k(q, k=7, mode="cosine")
    top = rerank_top_k(engine, q, k=7, recompute=recompute, candidates=7, window=window, query_batch=2)
    ids = list(engine.store.data_ids)
    terms = engine.token_scores(q, recompute(ids), mode="cosine")  # [n_query, n_docs, T]
    lengths = terms.mask.sum(1).long().tolist()
    for i in range(len(q)):
        assert sorted(top.indices[i].tolist()) == sorted(first.indices[i].tolist())
        for j, row in enumerate(top.indices[i].tolist()):
            s = terms.values[i, row]
            w = min(window, lengths[row])
            best = max(float(s[a : a + w].sum()) for a in range(lengths[row] - w + 1))
            assert abs(float(top.values[i, j]) - best) < 1e-5
            start, stop = top.positions[i, j].tolist()
            assert stop - start == w and abs(float(s[start:stop].sum()) - best) < 1e-5
        assert torch.all(top.values[i, :-1] >= top.values[i, 1:])


def test_a_window_over_whole_sequences_gives_the_store_scores(setting):
    engine, q, recompute = setting
    full = engine.scores(q, mode="cosine").values
    top = rerank_top_k(engine, q, k=5, recompute=recompute, candidates=5, window=100)
    want = full.gather(1, top.indices)
    assert torch.allclose(top.values, want, atol=1e-5)
    first = engine.top_k(q, k=5, mode="cosine")
    assert torch.equal(top.indices, first.indices)


def test_missing_recomputed_documents_are_an_error(setting):
    engine, q, recompute = setting
    with pytest.raises(ValueError, match="no per-token gradients"):
        rerank_top_k(engine, q, k=3, recompute=lambda ids: recompute(ids[:1]), candidates=3)
