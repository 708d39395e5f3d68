"""The Gram (Woodbury) form of the raw preconditioner equals the eigendecomposition form
(float64, relative error < 1e-8) for N < w, N = w and N > w, and the engine picks it where
N < w with the same scores in every mode as a dense solve."""

from __future__ import annotations

import pytest
import torch
from query_helpers import build_store, mlp_modules, mlp_rows, queries, reference_scores

from logix.curvature.gram import GramBlock
from logix.curvature.precondition import build_preconditioner, damping_value
from logix.curvature.preconditioner import Block
from logix.query.engine import InfluenceEngine
from logix.store.reader import open_store

# mlp_modules(): fc1 is 24 wide, fc2 15 wide; N = 10 < both, 24 = fc1 (> fc2), 40 > both.
SIZES = [10, 24, 40]


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module", params=SIZES)
def store(request, tmp_path_factory):
    x = mlp_rows(request.param, seed=5).float()
    return open_store(build_store(tmp_path_factory.mktemp(f"n{request.param}"), mlp_modules(), x)), x


@pytest.mark.parametrize("absolute", [False, True])
def test_gram_form_equals_eigen_form(store, absolute):
    store, x = store
    damping = 0.05 if absolute else 0.1
    gen = torch.Generator().manual_seed(0)
    # Block by block, both forms from the same float64 rows.
    for m in mlp_modules():
        g = x[:, m.columns].double()
        e, v = torch.linalg.eigh(g.T @ g / len(g))
        e = e.clamp(min=0)
        eigen_block = Block(m, e, v, damping_value(e, damping, absolute))
        gram_block = GramBlock.build(m, g, damping, absolute)
        assert gram_block.damping == pytest.approx(eigen_block.damping, rel=1e-12)
        q = torch.randn(5, m.width, dtype=torch.float64, generator=gen)
        assert rel_err(gram_block.apply(q), eigen_block.apply(q)) < 1e-8
        w = eigen_block.whiten(q)
        assert rel_err(gram_block.quadratic(q), (w * w).sum(1)) < 1e-8
        assert rel_err(gram_block.row_scores(q), eigen_block.apply(q) @ g.T) < 1e-6  # float32 out
        assert rel_err(gram_block.train_rows(0, len(g)), eigen_block.apply(g)) < 1e-6  # kept float32
    # Whole preconditioners against the dense float64 solve (the eigen form's statistics are
    # accumulated from float32 products, so it is exact to float32 only).
    gram = build_preconditioner(store, "raw", damping, absolute_damping=absolute, form="gram")
    eigen = build_preconditioner(store, "raw", damping, absolute_damping=absolute, form="eigen")
    assert all(isinstance(b, GramBlock) for b in gram.blocks.values())
    assert not any(isinstance(b, GramBlock) for b in eigen.blocks.values())
    _, hinv = reference_scores(x[:1], x, mlp_modules(), damping, absolute)
    q = torch.randn(5, store.width, dtype=torch.float64, generator=gen)
    assert rel_err(gram.apply(q), q @ hinv) < 1e-8
    assert rel_err(gram.quadratic(q), torch.einsum("nd,de,ne->n", q, hinv, q)) < 1e-8
    assert rel_err(eigen.apply(q), q @ hinv) < 1e-5
    xd = x.double()
    # Scores against the store's own rows: the first batch as whole score rows, later ones
    # through the kept preconditioned rows X̃; both equal Q' Xᵀ.
    ref = q @ hinv @ xd.T
    first, quad = gram.query_side(q)
    assert set(first.rows) == {"fc1", "fc2"}
    assert rel_err(gram.score(first, xd, 0), ref) < 1e-6  # float32 score rows
    assert rel_err(gram.score(first, xd[5:9], 5), ref[:, 5:9]) < 1e-6
    assert rel_err(quad, torch.einsum("nd,de,ne->n", q, hinv, q)) < 1e-8
    self_ref = torch.einsum("nd,de,ne->n", xd, hinv, xd)
    assert rel_err(gram.quadratic(xd, start=0), self_ref) < 1e-8  # no X̃ yet: float64 Woodbury
    again, _ = gram.query_side(q)
    assert again.rows == {} and all(b.preconditioned is not None for b in gram.blocks.values())
    assert rel_err(gram.score(again, xd, 0), ref) < 1e-6  # X̃ is float32
    assert rel_err(gram.score(again, xd[5:9], 5), ref[:, 5:9]) < 1e-6
    assert rel_err(gram.quadratic(xd, start=0), self_ref) < 1e-6
    assert rel_err(gram.quadratic(xd[3:7], start=3), self_ref[3:7]) < 1e-6
    assert rel_err(gram.quadratic(xd[3:7], start=3, per_module=True).sum(0), self_ref[3:7]) < 1e-6


def test_gram_block_against_woodbury_free_solve():
    g = torch.randn(7, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    module = mlp_modules()[0]
    block = GramBlock.build(module, g, 0.3, absolute=True)
    dense = torch.linalg.inv(g.T @ g / 7 + 0.3 * torch.eye(30, dtype=torch.float64))
    v = torch.randn(4, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert rel_err(block.apply(v), v @ dense) < 1e-10
    assert rel_err(block.quadratic(v), torch.einsum("nd,de,ne->n", v, dense, v)) < 1e-10
    assert rel_err(block.row_scores(v), v @ dense @ g.T) < 1e-6  # float32 out
    assert rel_err(block.train_rows(0, 7), g @ dense) < 1e-6
    assert block.to("cpu", torch.float32) is block  # stays float64 on its device


def test_engine_picks_gram_where_rows_are_fewer_and_matches_dense(store):
    store, x = store
    modules = mlp_modules()
    engine = InfluenceEngine(store, "raw", 0.1, chunk_bytes=3 * 4 * store.width)
    kinds = {m: isinstance(b, GramBlock) for m, b in engine.preconditioner.blocks.items()}
    assert kinds == {"fc1": len(x) < 24, "fc2": len(x) < 15}
    qr = mlp_rows(3, seed=6).float()
    q = queries(qr, modules)
    ref, hinv = reference_scores(qr, x, modules, 0.1)
    xd, qd = x.double(), qr.double()
    assert rel_err(engine.scores(q).values, ref) < 1e-4
    self_ref = torch.einsum("nd,de,ne->n", xd, hinv, xd)
    q_norm = torch.einsum("nd,de,ne->n", qd, hinv, qd).sqrt()
    assert rel_err(engine.self_influence().values, self_ref) < 1e-4
    assert rel_err(engine.scores(q, mode="relative").values, ref / self_ref.sqrt()) < 1e-4
    cosine = ref / (q_norm[:, None] * self_ref.sqrt()[None, :])
    assert rel_err(engine.scores(q, mode="cosine").values, cosine) < 1e-4
    per = engine.scores(q, per_module=True).values
    torch.testing.assert_close(per.sum(0), engine.scores(q).values, rtol=1e-5, atol=1e-5)
    top = engine.top_k(q, k=4)
    order = torch.sort(ref, dim=1, descending=True, stable=True).indices
    assert top.indices.tolist() == order[:, :4].tolist()
    fc1_only = InfluenceEngine(store, "raw", 0.1, modules=["fc1"]).scores(q).values
    ref_fc1 = qd[:, :24] @ hinv[:24, :24] @ xd[:, :24].T
    assert rel_err(fc1_only, ref_fc1) < 1e-4


def test_progress_reports_rows_for_gram_and_blocks_for_eigendecompositions(tmp_path):
    x = mlp_rows(20, seed=9).float()  # N = 20: fc1 (24 wide) Gram, fc2 (15 wide) eigen
    store = open_store(build_store(tmp_path / "run", mlp_modules(), x, statistics=False))
    seen = []
    pre = build_preconditioner(store, "raw", 0.1, chunk_rows=8, progress=lambda *a: seen.append(a))
    assert isinstance(pre.blocks["fc1"], GramBlock) and not isinstance(pre.blocks["fc2"], GramBlock)
    assert [a for a in seen if a[0] == "gram"] == [("gram", 8, 20), ("gram", 16, 20), ("gram", 20, 20)]
    assert [a for a in seen if a[0] == "eigen"] == [("eigen", 0, 1), ("eigen", 1, 1)]
    assert [a for a in seen if a[0] == "curvature"][-1] == ("curvature", 20, 20)
    seen.clear()
    build_preconditioner(store, "raw", 0.5, chunk_rows=8, progress=lambda *a: seen.append(a))
    assert [a for a in seen if a[0] == "eigen"] == [("eigen", 1, 1)]  # cached: no block starts


def test_gram_matrices_are_cached_per_block_and_a_bad_cache_is_recomputed(tmp_path, monkeypatch):
    import logix.curvature.precondition as precondition

    x = mlp_rows(10, seed=3).float()
    store = open_store(build_store(tmp_path / "run", mlp_modules(), x, statistics=False))
    real = precondition.gram_matrix
    calls = []
    monkeypatch.setattr(precondition, "gram_matrix", lambda g, p: calls.append(g.shape) or real(g, p))
    q = torch.randn(3, store.width, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    first = build_preconditioner(store, "raw", 0.1).apply(q)
    assert len(calls) == 2  # fc1 and fc2, both Gram (N = 10)
    other = build_preconditioner(store, "raw", 1.0).apply(q)  # another damping: cached K
    assert len(calls) == 2
    _, hinv = reference_scores(x[:1], x, mlp_modules(), 1.0)
    assert rel_err(other, q @ hinv) < 1e-5  # K in float32 products (auto)
    assert torch.equal(build_preconditioner(store, "raw", 0.1).apply(q), first)
    cache = store.curvature_dir / "gram-raw.safetensors"
    data = bytearray(cache.read_bytes())
    data[-1] ^= 0xFF  # a damaged cache fails its checksum: recomputed, never trusted
    cache.write_bytes(bytes(data))
    assert torch.equal(build_preconditioner(store, "raw", 0.1).apply(q), first)
    assert len(calls) == 4
