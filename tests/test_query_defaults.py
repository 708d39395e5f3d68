"""`InfluenceEngine(store)` and `logix query` take their defaults from the store's `query:`
config (preconditioner, damping, fisher, mode), and give the same answer."""

from __future__ import annotations

import json

import pytest
import torch
from query_helpers import build_store, mlp_modules, mlp_rows, queries, reference_scores
from rich.console import Console

from logix.cli import build_parser
from logix.commands import query as query_command
from logix.errors import ConfigError
from logix.query.engine import InfluenceEngine
from logix.store.reader import open_store


def configure(run_dir, query: dict) -> None:
    """Set the `query:` section of a store's logged config."""
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"] = {"query": query}
    path.write_text(json.dumps(manifest))


@pytest.fixture
def setup(tmp_path):
    modules = mlp_modules()
    x = mlp_rows(40, seed=3)
    run_dir = build_store(tmp_path / "run", modules, x)
    q = queries(mlp_rows(3, seed=4), modules)
    q.save(tmp_path / "q.safetensors")
    return run_dir, modules, x, q, tmp_path


def cli(argv: list[str]) -> tuple[int, str]:
    console = Console(record=True, width=140, file=open("/dev/null", "w"))
    code = query_command.main(build_parser().parse_args(["query", *argv]), console=console)
    return code, console.export_text()


def test_engine_and_cli_use_configured_raw_damping_and_mode(setup):
    run_dir, modules, x, q, tmp = setup
    configure(run_dir, {"preconditioner": "raw", "damping": 1.0, "mode": "cosine"})
    engine = InfluenceEngine(open_store(run_dir))
    assert engine.mode == "cosine" and engine.preconditioner.kind == "raw"
    explicit = InfluenceEngine(open_store(run_dir), "raw", 1.0)
    got = engine.scores(q)
    assert got.mode == "cosine"
    assert torch.equal(got.values, explicit.scores(q, mode="cosine").values)
    # damping 1.0 really is used: the dot scores equal the dense solve with λ = 1.0 · mean eig.
    ref, _ = reference_scores(q.values.double(), x, modules, 1.0)
    torch.testing.assert_close(engine.scores(q, mode="dot").values.double(), ref, rtol=1e-4, atol=1e-6)
    ref_default, _ = reference_scores(q.values.double(), x, modules, 0.1)
    assert not torch.allclose(ref_default, ref, rtol=1e-3)  # the test can tell the dampings apart

    code, text = cli(
        [
            str(run_dir),
            "--queries",
            str(tmp / "q.safetensors"),
            "--top-k",
            "5",
            "--output",
            str(tmp / "top.json"),
        ]
    )
    assert code == 0, text
    assert "top-5 influence (cosine, raw)" in text
    saved = json.loads((tmp / "top.json").read_text())
    top = engine.top_k(q, k=5)
    assert [r["indices"] for r in saved["results"]] == top.indices.tolist()
    assert [r["scores"] for r in saved["results"]] == top.values.tolist()
    assert saved["meta"]["damping"] == top.meta["damping"]


def test_engine_and_cli_use_configured_identity(setup):
    run_dir, modules, x, q, tmp = setup
    configure(run_dir, {"preconditioner": "identity", "damping": 1.0, "mode": "dot"})
    engine = InfluenceEngine(run_dir)
    assert engine.preconditioner.kind == "identity"
    torch.testing.assert_close(
        engine.scores(q).values.double(), q.values.double() @ x.T, rtol=1e-5, atol=1e-6
    )
    code, text = cli([str(run_dir), "--queries", str(tmp / "q.safetensors"), "--top-k", "3"])
    assert code == 0 and "top-3 influence (dot, identity)" in text
    # An explicit argument wins over the config.
    assert InfluenceEngine(run_dir, "raw").preconditioner.kind == "raw"


def test_engine_and_cli_use_configured_fisher(setup):
    run_dir, _, _, q, tmp = setup
    configure(run_dir, {"fisher": "true"})
    with pytest.raises(Exception, match="fit_curvature"):
        InfluenceEngine(run_dir)
    code, text = cli([str(run_dir), "--queries", str(tmp / "q.safetensors")])
    assert code == 2 and "fit_curvature" in text
    assert InfluenceEngine(run_dir, fisher="empirical").fisher == "empirical"


def test_configured_refine_applies_to_ekfac_only_and_bad_config_is_named(setup):
    run_dir, _, _, _, _ = setup
    configure(run_dir, {"preconditioner": "raw", "refine": 3})
    assert InfluenceEngine(run_dir).refine == 0  # the config's refine belongs to ekfac
    configure(run_dir, {"mode": "cosin"})
    with pytest.raises(ConfigError, match="query.mode"):
        InfluenceEngine(run_dir)


def test_old_argument_names_are_gone_and_chunks_are_bytes(setup):
    run_dir, _, _, q, _ = setup
    for old in ({"damping_absolute": True}, {"chunk_rows": 7}):  # 0.1.0 keeps no alias shims
        with pytest.raises(TypeError, match=next(iter(old))):
            InfluenceEngine(run_dir, "raw", 0.01, **old)
    by_bytes = InfluenceEngine(run_dir, "raw", chunk_bytes=7 * 4 * 39)
    assert by_bytes.chunk_rows == 7
    rounded = InfluenceEngine(run_dir, "raw", chunk_bytes=7 * 4 * 39 + 3)  # whole rows: 7 again
    assert rounded.chunk_rows == 7
    assert torch.equal(rounded.scores(q).values, by_bytes.scores(q).values)


def test_default_chunk_is_bounded_in_bytes(setup):
    from logix.query.transfer import DEFAULT_CHUNK_BYTES, rows_per_chunk

    run_dir, _, _, _, _ = setup
    engine = InfluenceEngine(run_dir, "identity")
    width = engine.store.width
    assert engine.chunk_rows * 4 * width <= DEFAULT_CHUNK_BYTES < (engine.chunk_rows + 1) * 4 * width
    assert rows_per_chunk(DEFAULT_CHUNK_BYTES, 1 << 20) == 16  # a 1M-wide row: 16 rows, 64 MiB
    assert rows_per_chunk(10, 1 << 20) == 1
    with pytest.raises(ValueError, match="chunk_bytes"):
        rows_per_chunk(0, 8)


def test_cli_chunk_bytes_give_the_same_top_k(setup):
    run_dir, _, _, q, tmp = setup
    outs = []
    for flag in (["--chunk-bytes", str(4 * 39 * 4)], ["--chunk-bytes", str(4 * 39 * 4 + 3)], []):
        out = tmp / f"top{len(outs)}.json"
        code, text = cli(
            [
                str(run_dir),
                "--queries",
                str(tmp / "q.safetensors"),
                "--top-k",
                "6",
                "--output",
                str(out),
                *flag,
            ]
        )
        assert code == 0, text
        outs.append(json.loads(out.read_text())["results"])
    assert outs[0] == outs[1] == outs[2]
    top = InfluenceEngine(run_dir, chunk_bytes=4 * 39 * 4).top_k(q, k=6)
    assert [r["indices"] for r in outs[0]] == top.indices.tolist()
