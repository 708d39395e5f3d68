"""Token-level re-ranking: the re-ranked lists are permutations of the candidates, scored by the
best window of position terms (norm="sequence") or by the cosine of the best window's own
gradient (norm="window"; the window's row captured through the ordinary logging path with a
window mask), both checked by brute force; a window covering whole sequences gives back the
store-wide scores."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from kfac_helpers import SeqNet, log_sequences, make_batches, seq_loss

import logix
from logix.curvature.gram import GramBlock
from logix.curvature.precondition import build_preconditioner
from logix.query.rerank import Rerank, rerank_top_k, window_norms


@pytest.fixture()
def setting(tmp_path):
    torch.manual_seed(0)
    model = SeqNet()
    gen = torch.Generator().manual_seed(3)
    batches = make_batches(gen, sizes=(4, 3, 5), seq=6)
    config = {
        "projection": {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 1},
        "capture": {"loss_reduction": "mean"},
        "curvature": {"statistics": ["raw", "kfac"]},
    }
    by_id, recompute = log_sequences(tmp_path / "s", model, batches, config)

    query = logix.init(tmp_path / "s", mode="query")
    query.watch(model)
    qx = torch.randn(3, 6, 5, generator=gen)
    qy, qmask = torch.randint(0, 3, (3, 6), generator=gen), torch.ones(3, 6, dtype=torch.long)
    with query(data_id=[0, 1, 2], mask=qmask):
        seq_loss(model(qx), qy, qmask, "mean").backward()
    engine = logix.InfluenceEngine(tmp_path / "s", preconditioner="raw", damping=0.1)
    return engine, query.gradients(), recompute, (tmp_path / "s", model, by_id)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_reranked_lists_are_candidates_with_their_best_window(setting, window):
    engine, q, recompute, _ = setting
    first = engine.top_k(q, k=7, mode="cosine")
    top = rerank_top_k(
        engine, q, k=7, recompute=recompute, candidates=7, window=window, norm="sequence", query_batch=2
    )
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


def window_row(run_dir, model, by_id, doc, start, stop) -> torch.Tensor:
    """The projected gradient row of `doc` with only positions start..stop-1 captured [D]."""
    x, y, mask = by_id[doc]
    keep = torch.zeros_like(mask)
    keep[start:stop] = 1
    q = logix.init(run_dir, mode="query")
    q.watch(model)
    with q(data_id=[doc], mask=(keep * mask)[None]):
        seq_loss(model(x[None]), y[None], mask[None], "mean").backward()
    return q.gradients().values[0]


@pytest.mark.parametrize("preconditioner", ["identity", "raw", "kfac", "ekfac"])
@pytest.mark.parametrize("window", [1, 3])
def test_window_norm_scores_each_window_as_its_own_gradient(setting, preconditioner, window):
    """identity / kfac / ekfac take the rotated-factor path of `window_norms`, raw the whitened
    window rows: each must match the window's own captured row."""
    engine, q, recompute, (run_dir, model, by_id) = setting
    engine = logix.InfluenceEngine(run_dir, preconditioner=preconditioner, damping=0.1)
    rerank = Rerank(recompute, candidates=6, window=window, query_batch=2)
    top = engine.top_k(q, k=4, mode="cosine", rerank=rerank)
    first = engine.top_k(q, k=6, mode="cosine")
    quad = engine.preconditioner.quadratic
    for i in range(len(q)):
        assert set(top.indices[i].tolist()) <= set(first.indices[i].tolist())
        qi = q.values[i].double()
        qn = float(quad(qi[None]).sqrt())
        best_of = {}
        for doc in first.indices[i].tolist():
            length = int(by_id[doc][2].sum())
            w = min(window, length)
            cos = {}
            for s in range(length - w + 1):
                g = window_row(run_dir, model, by_id, doc, s, s + w).double()
                if preconditioner == "identity":  # a dense reference: the plain cosine of the rows
                    c = float(qi @ g / (qi.norm() * g.norm()))
                else:  # polarisation: qᵀ(F+λI)⁻¹g from the metric's quadratic form alone
                    dot = float(quad((qi + g)[None]) - quad((qi - g)[None])) / 4
                    c = dot / (qn * float(quad(g[None]).sqrt()))
                cos[(s, s + w)] = c
            span = max(cos, key=cos.get)
            best_of[doc] = (cos[span], span)
        want = sorted(best_of.values(), key=lambda v: -v[0])[:4]
        got = top.values[i].tolist()
        assert all(abs(a - b[0]) < 2e-4 * max(1.0, abs(b[0])) for a, b in zip(got, want))
        for j, doc in enumerate(top.indices[i].tolist()):
            assert abs(got[j] - best_of[doc][0]) < 2e-4
            assert tuple(top.positions[i, j].tolist()) == best_of[doc][1]
    assert top.meta["rerank"] == {"candidates": 6, "window": window, "norm": "window"}


def test_gram_form_window_norms_equal_the_eigen_form(setting):
    engine, _, recompute, _ = setting
    tokens = recompute(list(engine.store.data_ids))
    t = max(f.positions for f in tokens.factors.values())
    gram = build_preconditioner(engine.store, "raw", 0.1, form="gram")
    assert all(isinstance(b, GramBlock) for b in gram.blocks.values())
    in_gram_form = SimpleNamespace(preconditioner=gram, device=torch.device("cpu"))
    for window in (1, 2):
        want = window_norms(engine, tokens, window, t)
        got = window_norms(in_gram_form, tokens, window, t)
        assert want.shape == (len(tokens), t - window + 1) and want.abs().sum() > 0
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("norm", ["window", "sequence"])
def test_a_window_over_whole_sequences_gives_the_store_scores(setting, norm):
    engine, q, recompute, _ = setting
    full = engine.scores(q, mode="cosine").values
    top = rerank_top_k(engine, q, k=5, recompute=recompute, candidates=5, window=100, norm=norm)
    want = full.gather(1, top.indices)
    assert torch.allclose(top.values, want, atol=1e-5)
    first = engine.top_k(q, k=5, mode="cosine")
    assert torch.equal(top.indices, first.indices)


def test_missing_recomputed_documents_are_an_error(setting):
    engine, q, recompute, _ = setting
    with pytest.raises(ValueError, match="no per-token gradients"):
        rerank_top_k(engine, q, k=3, recompute=lambda ids: recompute(ids[:1]), candidates=3)
    with pytest.raises(logix.ChoiceError, match="window"):
        rerank_top_k(engine, q, k=3, recompute=recompute, norm="windows")


@pytest.mark.parametrize("norm", ["window", "sequence"])
def test_token_gradients_of_another_store_are_refused(setting, norm):
    engine, q, recompute, _ = setting
    foreign = lambda ids: replace(recompute(ids), fingerprint="another store")  # noqa: E731
    with pytest.raises(logix.StoreError, match="other projections"):
        rerank_top_k(engine, q, k=3, recompute=foreign, candidates=3, norm=norm)


def test_window_gradients_of_a_one_hot_input_equal_the_dense_construction():
    """An Embedding kept whole stores (index, weight) per position; its window gradients must
    equal the windows of the same factors with x̃ written out as weight · e_index."""
    from logix.capture.tokens import PositionFactors
    from logix.query.rerank import module_windows

    gen = torch.Generator().manual_seed(0)
    n, k, t, r_out, vocab = 3, 2, 5, 4, 7
    g = torch.randn(n, k, t, r_out, generator=gen)
    index = torch.randint(0, vocab, (n, k, t), generator=gen)
    weight = torch.rand(n, k, t, generator=gen)
    dense_x = torch.nn.functional.one_hot(index, vocab).float() * weight[..., None]
    one_hot = PositionFactors(g, None, index, weight, vocab)
    dense = PositionFactors(g, dense_x, r_in=vocab)
    for window in (1, 2, 5):
        a, b = module_windows(one_hot, window), module_windows(dense, window)
        assert a.shape == (n, t - window + 1, r_out, vocab)
        assert torch.allclose(a, b, atol=1e-6)
    by_hand = torch.einsum("nktr,nkts->nrs", g[:, :, 1:3], dense_x[:, :, 1:3])  # positions 1, 2
    assert torch.allclose(module_windows(dense, 2)[:, 1], by_hand, atol=1e-5)
    assert torch.allclose(module_windows(one_hot, t)[:, 0], one_hot.sequence_gradient(), atol=1e-5)
