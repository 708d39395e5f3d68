"""Token-level attribution: per-position scores sum to the sequence scores, and each position's
score equals the term of an independent per-position gradient (torch.func, one weight copy per
position)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import (
    C,
    TinyDecoder,
    document_batch,
    log_documents,
    question_batch,
    sequence_losses,
)
from torch import nn
from torch.func import grad

import logix
from logix.errors import CaptureError, StoreError

DAMPING = 0.1


_STORES: dict[int, tuple] = {}


def setup_lm(tmp_path_factory, rank_in: int):
    """A tiny decoder and a store of all documents (padded batches of 8, mean-reduced loss),
    built once per rank for the module; and a fresh query run holding the gradients of 3
    held-out questions. Returns (corpus, model, query run, store directory)."""
    if rank_in not in _STORES:
        torch.manual_seed(0)
        c = C.generate(n_entities=6, seed=3)
        model = TinyDecoder(len(c.vocab), d_model=16, n_layers=1, n_heads=2, max_len=64)
        config = {
            "capture": {"types": ["Linear", "Embedding"], "attribution_only": True},
            "projection": {"kind": "random", "rank_in": rank_in, "rank_out": 5, "seed": 1},
        }
        run_dir = tmp_path_factory.mktemp(f"lm{rank_in}") / "r"
        log_documents(model, c, run_dir, config)
        _STORES[rank_in] = (c, model, run_dir)
    c, model, run_dir = _STORES[rank_in]
    query = logix.init(run_dir, mode="query")
    query.watch(model)
    qb = question_batch(c, c.test_questions[:3])
    with query(data_id=["q0", "q1", "q2"], mask=qb.pad_mask):
        sequence_losses(model, qb).mean().backward()
    return c, model, query, run_dir


def capture_tokens(c, model, query, docs) -> logix.TokenGradients:
    """Two per-token blocks of different padded lengths (so positions are padded twice)."""
    for part in (docs[:2], docs[2:]):
        b = document_batch(c, [d.text for d in part])
        with query(data_id=[d.doc_id for d in part], mask=b.pad_mask, per_token=True, token_ids=b.tokens):
            sequence_losses(model, b).mean().backward()
    return query.token_gradients()


def chosen_documents(c):
    by_length = sorted(c.documents, key=lambda d: len(d.text.split()))
    return [by_length[0], by_length[-1], by_length[len(by_length) // 2], by_length[1]]


@pytest.mark.parametrize("rank_in", [6, 1000])  # 1000: every input side whole (one-hot Embedding)
@pytest.mark.parametrize("preconditioner", ["identity", "raw"])
def test_token_scores_sum_to_sequence_scores(tmp_path_factory, rank_in, preconditioner):
    c, model, query, run_dir = setup_lm(tmp_path_factory, rank_in)
    docs = chosen_documents(c)
    tokens = capture_tokens(c, model, query, docs)
    assert tokens.factors["tok"].one_hot == (rank_in == 1000)
    engine = logix.InfluenceEngine(run_dir, preconditioner=preconditioner, damping=DAMPING)
    q = query.gradients()
    columns = [engine.store.data_ids.index(d.doc_id) for d in docs]
    lengths = [len(c.encode(d.text)) for d in docs]
    for mode in ("dot", "cosine", "relative"):
        ts = engine.token_scores(q, tokens, mode=mode)
        assert ts.values.shape == (3, len(docs), max(lengths))
        assert ts.train_ids == [d.doc_id for d in docs] and ts.query_ids == ["q0", "q1", "q2"]
        with pytest.raises(AttributeError, match="train_ids"):
            ts.data_ids  # noqa: B018
        want = engine.scores(q, mode=mode).values[:, columns]
        torch.testing.assert_close(ts.sequence_scores(), want, rtol=1e-4, atol=1e-5 * want.abs().max())
        for j, n in enumerate(lengths):  # padded positions (and positions past the end) are 0
            assert torch.all(ts.values[:, j, n:] == 0) and ts.values[:, j, :n].abs().sum() > 0
            assert ts.token_ids[j, :n].tolist() == c.encode(docs[j].text)
            assert ts.mask[j].sum() == n
    per_module = engine.token_scores(q, tokens, per_module=True)
    assert per_module.modules == [m.name for m in engine.store.modules]
    torch.testing.assert_close(per_module.values.sum(0), engine.token_scores(q, tokens).values)
    # The sequences' rows rebuilt from the factors are the rows the logging pass stored.
    stored = engine.store.load()[columns]
    torch.testing.assert_close(tokens.gradients().values, stored, rtol=1e-4, atol=1e-6)


def per_position_gradient(model, module, batch, loss_fn) -> torch.Tensor:
    """∂ℓ/∂W_t for every position t of one sequence, as [T, d_out, d_in(+1)]: the layer is run
    with an independent copy (W_t, b_t) of its parameters at each position, and torch.func takes
    the gradient with respect to all copies at once (each copy sees one position's term only)."""
    tokens = batch.tokens if hasattr(batch, "tokens") else batch

    def with_layer(forward):
        def loss(*params):
            handle = module.register_forward_hook(lambda m, i, o: forward(i[0], *params))
            try:
                return loss_fn()
            finally:
                handle.remove()

        return loss

    if isinstance(module, nn.Embedding):
        t = tokens.shape[1]
        w = module.weight.detach().expand(t, *module.weight.shape).clone()  # [T, V, d]
        g = grad(with_layer(lambda x, w: w[torch.arange(t), x[0]][None]))(w)
        return g.transpose(1, 2).detach()  # the map is weightᵀ: [T, d, V]
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size

        def conv(x, w, b):  # every output pixel l with its own (W_l, b_l)
            patches = F.unfold(x, (kh, kw), padding=module.padding, stride=module.stride)
            h = (x.shape[2] + 2 * module.padding[0] - kh) // module.stride[0] + 1
            y = torch.einsum("bil,loi->bol", patches, w) + b.T[None]
            return y.reshape(x.shape[0], w.shape[1], h, -1)

        t = module(tokens).shape[2] * module(tokens).shape[3]
        forward = conv
    else:
        t = batch.tokens.shape[1]
        forward = lambda x, w, b: torch.einsum("btd,tod->bto", x, w) + b[None]
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    params = (w.expand(t, *w.shape).clone(), module.bias.detach().expand(t, -1).clone())
    gw, gb = grad(with_layer(forward), argnums=(0, 1))(*params)
    return torch.cat([gw, gb[..., None]], dim=2).detach()


def preconditioned_block(store, q: torch.Tensor, name: str, kind: str) -> torch.Tensor:
    """Q'_m [n, d_out, d_in] by a dense float64 inverse of F_m + λI from the stored rows."""
    m = next(m for m in store.modules if m.name == name)
    qm = q[:, m.columns].double()
    if kind == "raw":
        x = store.load()[:, m.columns].double()
        f = x.T @ x / x.shape[0]
        lam = DAMPING * torch.trace(f) / m.width
        qm = qm @ torch.linalg.inv(f + lam * torch.eye(m.width, dtype=torch.float64))
    return qm.reshape(-1, m.r_out, m.r_in)


@pytest.mark.parametrize("name", ["blocks.0.fc1", "tok"])
@pytest.mark.parametrize("rank_in", [6, 1000])
def test_token_scores_equal_per_position_gradients(tmp_path_factory, name, rank_in):
    c, model, query, run_dir = setup_lm(tmp_path_factory, rank_in)
    docs = chosen_documents(c)
    tokens = capture_tokens(c, model, query, docs)
    engine = logix.InfluenceEngine(run_dir, preconditioner="raw", damping=DAMPING, modules=name)
    ts = engine.token_scores(query.gradients(), tokens)
    qm = preconditioned_block(engine.store, query.gradients().values, name, "raw")
    projection = query.projections[name]
    module = dict(model.named_modules())[name]
    for j, d in enumerate(docs):
        batch = document_batch(c, [d.text])  # unpadded, alone
        g = per_position_gradient(model, module, batch, lambda b=batch: sequence_losses(model, b).sum())
        g = g.double()
        for p, side in ((projection.p_out, "out"), (projection.p_in, "in")):
            if p.matrix is not None:
                g = p.matrix.double() @ g if side == "out" else g @ p.matrix.double().T
        want = torch.einsum("qoi,toi->qt", qm, g)  # [n_query, T]
        n = g.shape[0]
        torch.testing.assert_close(
            ts.values[:, j, :n].double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max())
        )
        assert torch.all(ts.values[:, j, n:] == 0)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)  # 7x7 -> 4x4: 16 positions
        self.c2 = nn.Conv2d(3, 2, 2)  # 4x4 -> 3x3: 9 positions
        self.head = nn.Linear(18, 4)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def test_conv_positions_are_output_pixels(tmp_path):
    torch.manual_seed(3)
    model = ConvNet()
    x, y = torch.randn(12, 2, 7, 7), torch.randint(0, 4, (12,))
    config = {"projection": {"kind": "random", "rank_in": 5, "rank_out": 2, "seed": 2}}
    run_dir = tmp_path / "r"
    with logix.init(run_dir, config=config) as run:
        run.watch(model)
        with run(data_id=list(range(12))):
            F.cross_entropy(model(x), y).backward()
    query = logix.init(run_dir, mode="query")
    query.watch(model)
    with query(data_id=["a", "b"]):
        F.cross_entropy(model(x[:2] + 0.3), y[:2]).backward()
    with query(data_id=[3, 4, 5], per_token=True):
        F.cross_entropy(model(x[3:6]), y[3:6]).backward()
    tokens = query.token_gradients()
    assert {k: f.positions for k, f in tokens.factors.items()} == {"c1": 16, "c2": 9, "head": 1}
    q = query.gradients()
    engine = logix.InfluenceEngine(run_dir, preconditioner="raw", damping=DAMPING)
    with pytest.raises(ValueError, match="per_module=True"):
        engine.token_scores(q, tokens)
    ts = engine.token_scores(q, tokens, per_module=True)
    assert ts.values.shape == (3, 2, 3, 16)
    want = engine.scores(q, per_module=True).values[:, :, 3:6]
    torch.testing.assert_close(ts.values.sum(-1), want, rtol=1e-4, atol=1e-6)
    # One module: its per-pixel scores against an independent per-pixel gradient.
    one = logix.InfluenceEngine(run_dir, preconditioner="raw", damping=DAMPING, modules="c1")
    values = one.token_scores(q, tokens).values
    qm = preconditioned_block(one.store, q.values, "c1", "raw")
    p = query.projections["c1"]
    for j, i in enumerate((3, 4, 5)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        g = per_position_gradient(
            model, model.c1, xi, lambda xi=xi, yi=yi: F.cross_entropy(model(xi), yi, reduction="sum")
        )
        g = p.p_out.matrix.double() @ g.double() @ p.p_in.matrix.double().T
        torch.testing.assert_close(
            values[:, j].double(), torch.einsum("qoi,toi->qt", qm, g), rtol=1e-4, atol=1e-7
        )


def test_several_backward_passes_add_up(tmp_path_factory):
    """Two forward/backward passes in one per-token block: the factors of both are kept and
    their per-position terms add up to the gradient of the sum."""
    c, model, query, run_dir = setup_lm(tmp_path_factory, 6)
    docs = chosen_documents(c)[:3]
    b = document_batch(c, [d.text for d in docs])
    with query(data_id=["x", "y", "z"], mask=b.pad_mask):
        sequence_losses(model, b).mean().backward()
        (0.5 * sequence_losses(model, b).mean()).backward()
    with query(data_id=["x", "y", "z"], mask=b.pad_mask, per_token=True):
        sequence_losses(model, b).mean().backward()
        (0.5 * sequence_losses(model, b).mean()).backward()
    tokens = query.token_gradients()
    assert tokens.factors["blocks.0.fc1"].g.shape[1] == 2  # K = 2 passes
    everything = query.gradients()
    rows = everything.select([3, 4, 5])  # the summed rows of the first block
    torch.testing.assert_close(tokens.gradients().values, rows.values, rtol=1e-5, atol=1e-6)
    engine = logix.InfluenceEngine(run_dir, preconditioner="identity")
    q = everything.select([0, 1, 2])
    got = engine.token_scores(q, tokens).sequence_scores()
    want = q.values @ rows.values.T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_top_tokens_and_errors(tmp_path, tmp_path_factory):
    c, model, query, run_dir = setup_lm(tmp_path_factory, 6)
    docs = chosen_documents(c)[:2]
    b = document_batch(c, [d.text for d in docs])
    with pytest.raises(ValueError, match="per_token=True"):
        query(data_id=[0, 1], token_ids=b.tokens)
    with pytest.raises(ValueError, match="token_ids"):
        query(data_id=[0, 1], per_token=True, token_ids=b.tokens[:, :3], mask=b.pad_mask)
    with pytest.raises(CaptureError, match="per_token=True"):
        query.token_gradients()
    with pytest.raises(CaptureError, match="no gradient"), query(data_id=[0, 1], per_token=True):
        pass
    tokens = capture_tokens(c, model, query, docs + docs)
    engine = logix.InfluenceEngine(run_dir, preconditioner="identity")
    ts = engine.token_scores(query.gradients(), tokens)
    short = 0 if len(docs[0].text.split()) < len(docs[1].text.split()) else 1
    top = ts.top_tokens(0, short, k=1000)
    n = len(c.encode(docs[short].text))
    assert len(top) == n  # padding skipped
    assert [s for _, _, s in top] == sorted((s for _, _, s in top), reverse=True)
    assert {(p, t) for p, t, _ in top} == set(enumerate(c.encode(docs[short].text)))
    scores, ids = ts.for_query(1)
    assert scores.shape == ts.values.shape[1:] and torch.equal(ids, ts.token_ids)
    # Another store's token gradients are refused.
    log = logix.init(tmp_path / "log", config={"capture": {"types": ["Linear"]}})
    with pytest.raises(ValueError, match="query-mode"):
        log(data_id=[0], per_token=True)
    log.watch(model)
    log.finalize()
    other = logix.init(tmp_path / "log", mode="query")
    other.watch(model)
    with other(data_id=[0, 1], per_token=True):
        sequence_losses(model, b).mean().backward()
    with pytest.raises(StoreError, match="other projections"):
        engine.token_scores(query.gradients(), other.token_gradients())


@pytest.mark.parametrize("r_in, r_out", [(3, 7), (7, 3), (4, 4)])
def test_contraction_matches_outer_products(monkeypatch, r_in, r_out):
    """Both contraction orders, the one-hot gather and the position blocks (a tiny budget forces
    many) against the [T, r_out, r_in] outer products formed explicitly."""
    from logix.capture.tokens import PositionFactors
    from logix.query import tokens as T

    monkeypatch.setattr(T, "_BUDGET", 40)
    gen = torch.Generator().manual_seed(r_in * 10 + r_out)
    q = torch.randn(3, r_out, r_in, generator=gen)
    g = torch.randn(4, 2, 5, r_out, generator=gen)
    x = torch.randn(4, 2, 5, r_in, generator=gen)
    want = torch.einsum("qoi,nkto,nkti->qnt", q, g, x)
    got = T._module_scores(q, PositionFactors(g, x, r_in=r_in), torch.device("cpu"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    index = torch.randint(0, r_in, (4, 2, 5), generator=gen)
    weight = torch.randn(4, 2, 5, generator=gen)
    one_hot = F.one_hot(index, r_in).float() * weight[..., None]
    f = PositionFactors(g, None, index, weight, r_in)
    torch.testing.assert_close(
        T._module_scores(q, f, torch.device("cpu")),
        torch.einsum("qoi,nkto,nkti->qnt", q, g, one_hot),
        rtol=1e-5,
        atol=1e-5,
    )
    torch.testing.assert_close(
        f.sequence_gradient(), torch.einsum("nkto,nkti->noi", g, one_hot), rtol=1e-5, atol=1e-5
    )


def test_token_attribution_example_runs(tmp_path):
    """The example end to end on a tiny, briefly trained model (its figures need the defaults)."""
    import token_attribution

    result = token_attribution.main(
        [
            "--entities",
            "6",
            "--epochs",
            "2",
            "--d-model",
            "16",
            "--layers",
            "1",
            "--heads",
            "2",
            "--rank",
            "4",
            "--show",
            "1",
            "--batch",
            "16",
            "--out",
            str(tmp_path),
        ]
    )
    assert result["questions"] > 0 and result["sum_relative_gap"] < 1e-4
    assert (tmp_path / "token_attribution.json").exists()


@pytest.mark.parametrize("preconditioner", ["identity", "raw"])
def test_window_reranking_with_a_one_hot_embedding(tmp_path_factory, preconditioner):
    """Re-ranking by the window's own cosine on a decoder whose token Embedding is kept whole:
    a window over whole documents gives back their store cosine; single positions are cosines."""
    from logix.query.rerank import rerank_top_k

    c, model, query, run_dir = setup_lm(tmp_path_factory, 1000)
    engine = logix.InfluenceEngine(run_dir, preconditioner=preconditioner, damping=DAMPING)
    q = query.gradients()

    def recompute(ids):
        run = logix.init(run_dir, mode="query")
        run.watch(model)
        b = document_batch(c, [c.documents[i].text for i in ids])
        with run(data_id=list(ids), mask=b.pad_mask, per_token=True):
            sequence_losses(model, b).mean().backward()
        return run.token_gradients()

    whole = rerank_top_k(engine, q, k=6, recompute=recompute, candidates=6, window=1000)
    assert recompute([0]).factors["tok"].one_hot
    full = engine.scores(q, mode="cosine").values
    assert torch.allclose(whole.values, full.gather(1, whole.indices), atol=1e-5)
    single = rerank_top_k(engine, q, k=6, recompute=recompute, candidates=6, window=1)
    assert torch.isfinite(single.values).all() and (single.values.abs() <= 1 + 1e-5).all()
    assert torch.all(single.positions[..., 1] - single.positions[..., 0] == 1)
