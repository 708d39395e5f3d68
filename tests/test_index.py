"""The approximate index (`logix.build_index`, `InfluenceEngine(index=...)`, `logix index`):
its top-k against dense float64 scores and the exact scan, exhaustive search, staleness after
re-logging, damaged files, refused configurations, the CLI."""

from __future__ import annotations

import sys

import pytest
import torch
from query_helpers import build_store
from rich.console import Console

pytest.importorskip("faiss")

import logix
from logix.cli import build_parser
from logix.commands import index as index_command
from logix.errors import ConfigError, StoreError
from logix.query.index_calibrate import ExactNeighbours
from logix.store.ann import ann_dir, record_path
from logix.store.create import remove_store
from logix.store.format import ModuleInfo

MODULES = [ModuleInfo("a", "Linear", 4, 4, 4, 4, False, 0), ModuleInfo("b", "Linear", 8, 4, 8, 4, False, 16)]
WIDTH = 48


def clustered(n: int, seed: int, centres: int = 24) -> torch.Tensor:
    """Rows [n, 48] float64 around `centres` random directions, with norms spread over 0.3..3
    (so that cosine and dot rank differently)."""
    gen = torch.Generator().manual_seed(100)  # the same centres for store and queries
    c = torch.randn(centres, WIDTH, generator=gen, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    which = torch.randint(0, centres, (n,), generator=gen)
    x = c[which] + 0.35 * torch.randn(n, WIDTH, generator=gen, dtype=torch.float64)
    return x * (0.3 + 2.7 * torch.rand(n, 1, generator=gen, dtype=torch.float64))


@pytest.fixture
def store_dir(tmp_path):
    return build_store(tmp_path / "run", MODULES, clustered(3000, 1), shard_rows=512, statistics=False)


@pytest.fixture
def q():
    return clustered(12, 2)


def dense_top(q: torch.Tensor, x: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """Reference: the top-k rows by float64 scores, ties to the lower row (stable sort)."""
    s = q.double() @ x.double().T
    if mode != "dot":
        s = s / x.double().norm(dim=1)[None]
    if mode == "cosine":
        s = s / q.double().norm(dim=1)[:, None]
    return torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)]
    return sum(hits) / exact.numel()


def test_index_top_k_finds_the_exact_top_k_on_a_clustered_store(store_dir, q):
    store = logix.open_store(store_dir)
    x = store.load()
    index = logix.build_index(store, nlist=32)  # nprobe: the fewest cells reaching recall 0.95
    assert record_path(store_dir, "0", "cosine").is_file()
    calibration = index.record["calibration"]
    assert (
        calibration["recall"] >= calibration["recall_lower"] >= 0.95
        and calibration["nprobe"] == index.nprobe < 32
    )
    fewer = logix.build_index(store, nlist=32, nprobe=index.nprobe - 1, save=False)
    assert fewer.record["calibration"]["recall_lower"] < 0.95 and fewer.nprobe == index.nprobe - 1
    exact = logix.InfluenceEngine(store, preconditioner="identity", mode="cosine")
    fast = logix.InfluenceEngine(store, preconditioner="identity", mode="cosine", index=index)
    for mode in ("cosine", "relative"):
        ref = dense_top(q, x, 50, mode)
        got = fast.top_k(q, k=50, mode=mode)
        assert got.meta["index"] == {
            "kind": "ivf-flat",
            "metric": "cosine",
            "nlist": 32,
            "nprobe": index.nprobe,
        }
        assert got.values.shape == (12, 50) and got.train_ids[0][0] == store.data_ids[got.indices[0, 0]]
        assert recall(got.indices, ref) >= 0.95
        # Every returned row carries its exact score, in the exact scan's order.
        full = exact.scores(q, mode=mode).values
        assert torch.allclose(got.values, full.gather(1, got.indices), atol=1e-5, rtol=1e-5)
        assert bool((got.values[:, :-1] >= got.values[:, 1:]).all())
    # Scanning too few cells misses rows: the recall above is the index's, not the exact scan's.
    one = logix.InfluenceEngine(
        store, preconditioner="identity", index=logix.open_index(store, nprobe=1), mode="cosine"
    )
    assert recall(one.top_k(q, k=400).indices, dense_top(q, x, 400, "cosine")) < 0.95


@pytest.mark.parametrize("metric,mode", [("cosine", "cosine"), ("cosine", "relative"), ("dot", "dot")])
def test_exhaustive_index_equals_the_exact_scan(store_dir, q, metric, mode):
    store = logix.open_store(store_dir)
    logix.build_index(store, metric, nlist=16, nprobe=16)
    engine = logix.InfluenceEngine(store, preconditioner="identity", mode=mode, index="saved")
    got = engine.top_k(q, k=20)
    want = logix.InfluenceEngine(store, preconditioner="identity", mode=mode).top_k(q, k=20)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.indices, dense_top(q, store.load(), 20, mode))
    assert torch.allclose(got.values, want.values, atol=1e-5, rtol=1e-5)
    assert got.train_ids == want.train_ids and got.query_ids == want.query_ids


def test_calibration_neighbours_are_the_dense_top_k_without_the_own_row():
    x = torch.nn.functional.normalize(clustered(500, 6).float(), dim=1)
    own = torch.tensor([3, 250, 499])
    exact = ExactNeighbours(x[own], own, 40)
    for start in range(0, 500, 64):  # chunks as the build's pass gives them
        exact.add(x[start : start + 64], start)
    order = dense_top(x[own], x, 41, "dot").tolist()
    assert exact.neighbours() == [set([j for j in row if j != o][:40]) for row, o in zip(order, own.tolist())]


def test_zero_queries_and_k_above_rows_match_the_exact_scan(tmp_path):
    run = build_store(tmp_path / "small", MODULES, clustered(80, 3), shard_rows=32, statistics=False)
    store = logix.open_store(run)
    index = logix.build_index(store, nlist=2, nprobe=1)
    q = clustered(3, 4)
    q[1] = 0.0
    fast = logix.InfluenceEngine(store, preconditioner="identity", mode="cosine", index=index)
    exact = logix.InfluenceEngine(store, preconditioner="identity", mode="cosine")
    got, want = fast.top_k(q, k=500), exact.top_k(q, k=500)  # more cells probed until k are found
    assert got.indices.shape == (3, 80) and torch.equal(got.indices, want.indices)
    assert torch.equal(got.values[1], torch.zeros(80))
    dot = logix.InfluenceEngine(
        store, preconditioner="identity", mode="dot", index=logix.build_index(store, "dot", nlist=4, nprobe=1)
    )
    exact_dot = logix.InfluenceEngine(store, preconditioner="identity", mode="dot").top_k(q, k=5)
    assert torch.equal(dot.top_k(q, k=5).indices[1], exact_dot.indices[1])  # rows 0..4, all scoring 0


def test_stale_index_is_refused_after_logging_or_relogging(store_dir, q):
    store = logix.open_store(store_dir)
    index = logix.build_index(store, nlist=16)
    # More rows logged into the segment: a new shard.
    writer = logix.store.writer.StoreWriter(store_dir, width=WIDTH, dtype="float32", shard_rows=512)
    writer.start_segment("0")
    writer.add(list(range(3000, 3010)), clustered(10, 5).float())
    writer.close()
    grown = logix.open_store(store_dir)
    with pytest.raises(StoreError, match="stale"):
        logix.open_index(grown)
    with pytest.raises(StoreError, match="stale"):
        logix.InfluenceEngine(grown, preconditioner="identity", mode="cosine", index=index)
    # Re-logged from scratch with other rows of the same count and shard layout.
    remove_store(store_dir)
    build_store(store_dir, MODULES, clustered(3000, 9), shard_rows=512, statistics=False)
    relogged = logix.open_store(store_dir)
    assert len(relogged) == len(store)
    with pytest.raises(StoreError, match="stale.*logix index"):
        logix.InfluenceEngine(relogged, preconditioner="identity", mode="cosine", index="saved")
    logix.build_index(relogged, nlist=16, nprobe=16)  # the rebuild is used
    got = logix.InfluenceEngine(relogged, preconditioner="identity", mode="cosine", index="saved").top_k(q, 5)
    assert torch.equal(got.indices, dense_top(q, relogged.load(), 5, "cosine"))


def test_damaged_or_missing_index_is_refused_and_rebuilt(store_dir):
    store = logix.open_store(store_dir)
    with pytest.raises(StoreError, match="no cosine index.*logix index"):
        logix.open_index(store)
    logix.build_index(store, nlist=16)
    (path,) = ann_dir(store_dir, "0").glob("cosine-*.faiss")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not match its record.*--build"):
        logix.open_index(store)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(StoreError, match="does not match its record"):
        logix.open_index(store)
    record_path(store_dir, "0", "cosine").write_text("{not json")
    with pytest.raises(StoreError, match="damaged"):
        logix.open_index(store)
    orphan = ann_dir(store_dir, "0") / ".cosine.faiss.tmp-999999999"  # a killed build's (no such pid)
    orphan.write_bytes(b"partial")
    rebuilt = logix.build_index(store, nlist=16)
    assert logix.open_index(store).record["sha256"] == rebuilt.record["sha256"]
    assert {p.name for p in ann_dir(store_dir, "0").iterdir()} == {"cosine.json", rebuilt.record["file"]}


def test_configurations_the_index_does_not_answer_are_refused(store_dir, q):
    store = logix.open_store(store_dir)
    index = logix.build_index(store, nlist=16)
    for kwargs, match in (
        (
            {"preconditioner": "raw", "damping": 0.1},
            "identity preconditioner only.*preconditioner='identity'",
        ),
        ({"preconditioner": "identity", "modules": ["a"]}, "whole rows.*drop modules="),
        ({"preconditioner": "identity", "mode": "dot"}, "needs a dot index.*--metric dot"),
    ):
        with pytest.raises(ConfigError, match=match):
            logix.InfluenceEngine(store, index=index, **{"mode": "cosine", **kwargs})
    engine = logix.InfluenceEngine(store, preconditioner="identity", mode="cosine", index=index)
    with pytest.raises(ConfigError, match="needs a dot index"):
        engine.top_k(q, 5, mode="dot")
    with pytest.raises(ValueError, match="'saved' or None"):
        logix.InfluenceEngine(store, preconditioner="identity", index="yes")


def test_missing_faiss_names_the_extra(store_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r'pip install "logix\[index\]"'):
        logix.build_index(logix.open_store(store_dir))


def cli(argv: list[str]) -> tuple[int, str]:
    console = Console(record=True, width=200, file=open("/dev/null", "w"))
    code = index_command.main(build_parser().parse_args(["index", *argv]), console=console)
    return code, console.export_text()


def test_cli_builds_and_describes_the_index(store_dir):
    code, text = cli([str(store_dir)])
    assert code == 1 and "no cosine index" in text
    code, text = cli([str(store_dir), "--build", "--nlist", "8"])
    assert code == 0 and "3000 rows, 8 cells, nprobe" in text and "recall@100" in text, text
    code, text = cli([str(store_dir), "--info"])
    assert code == 0 and "current" in text and "8 cells" in text, text
    (path,) = ann_dir(store_dir, "0").glob("cosine-*.faiss")
    path.write_bytes(path.read_bytes()[:-8])
    code, text = cli([str(store_dir), "--info"])
    assert code == 1 and "not usable" in text
    code, text = cli([str(store_dir), "--build", "--metric", "euclid"])
    assert code == 2 and "euclid" in text


def test_reranking_takes_its_candidates_from_the_index(tmp_path):
    from kfac_helpers import SeqNet, log_sequences, make_batches

    torch.manual_seed(0)
    model = SeqNet()
    gen = torch.Generator().manual_seed(3)
    batches = make_batches(gen, sizes=(30, 30, 30), seq=6)
    config = {"projection": {"kind": "random", "rank_in": 3, "rank_out": 2, "seed": 1}}
    by_id, recompute = log_sequences(tmp_path / "s", model, batches, config)

    store = logix.open_store(tmp_path / "s")
    q = logix.Gradients(store.load()[[3, 40, 77]] + 0.01, ["a", "b", "c"], store.modules, store.fingerprint)
    exact = logix.InfluenceEngine(store, preconditioner="identity", mode="cosine")
    rerank = logix.Rerank(recompute, candidates=8, window=2)
    for nprobe in (1, 2):  # of 2 cells: partial, then exhaustive
        index = logix.build_index(store, nlist=2, nprobe=nprobe, save=False)
        fast = logix.InfluenceEngine(store, preconditioner="identity", mode="cosine", index=index)
        got = fast.top_k(q, k=8, rerank=rerank)
        first = fast.top_k(q, k=8)
        assert got.meta["index"]["nprobe"] == nprobe and "rerank" in got.meta
        for row, cand in zip(got.indices.tolist(), first.indices.tolist()):
            assert sorted(row) == sorted(cand)  # a permutation of the index's candidates
    want = exact.top_k(q, k=8, rerank=rerank)
    assert torch.equal(got.indices, want.indices) and torch.allclose(got.values, want.values, atol=1e-6)
