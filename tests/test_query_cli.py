"""`logix query`: the table, the output file, and one red line with exit code 2 on errors."""

from __future__ import annotations

import json

import pytest
from query_helpers import build_store, mlp_modules, mlp_rows, queries
from rich.console import Console

from logix.cli import build_parser
from logix.commands import query as query_command
from logix.query.results import load_result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    modules = mlp_modules()
    build_store(base / "run", modules, mlp_rows(30, seed=1))
    queries(mlp_rows(3, seed=2), modules).save(base / "q.safetensors")
    queries(mlp_rows(2, seed=2), modules, fingerprint="cd" * 32).save(base / "other.safetensors")
    return base


def call(argv: list[str]) -> tuple[int, str]:
    console = Console(record=True, width=120, file=open("/dev/null", "w"))
    args = build_parser().parse_args(["query", *argv])
    code = query_command.main(args, console=console)
    return code, console.export_text()


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_query_prints_table_and_writes_output(run, suffix):
    out = run / f"top{suffix}"
    code, text = call(
        [
            str(run / "run"),
            "--queries",
            str(run / "q.safetensors"),
            "--top-k",
            "4",
            "--mode",
            "relative",
            "--output",
            str(out),
        ]
    )
    assert code == 0, text
    assert "top-4 influence (relative, raw)" in text
    assert all(q in text for q in ("q0", "q1", "q2")) and "30 train rows" in text
    if suffix == ".json":
        saved = json.loads(out.read_text())
        assert [r["query_id"] for r in saved["results"]] == ["q0", "q1", "q2"]
        assert len(saved["results"][0]["train_ids"]) == 4
        assert str(saved["results"][0]["train_ids"][0]) in text
    else:
        top = load_result(out)
        assert top.values.shape == (3, 4) and top.query_ids == ["q0", "q1", "q2"]


def test_query_identity_subset_and_show(run):
    code, text = call(
        [
            str(run / "run"),
            "--queries",
            str(run / "q.safetensors"),
            "--top-k",
            "2",
            "--preconditioner",
            "identity",
            "--modules",
            "fc2",
            "--show",
            "1",
        ]
    )
    assert code == 0, text
    assert "q0" in text and "q1" not in text and "2 more queries" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--queries", "missing.safetensors"], "does not exist"),
        (["--queries", "{other}"], "other projections"),
        (["--queries", "{q}", "--mode", "cosin"], "did you mean 'cosine'"),
        (["--queries", "{q}", "--preconditioner", "rwa"], "did you mean 'raw'"),
        (["--queries", "{q}", "--segment", "7"], "no segment '7'"),
        (["--queries", "{q}", "--fisher", "true"], "run.fit_curvature"),
        (["--queries", "{q}", "--fisher", "emprical"], "did you mean 'empirical'"),
        (["--queries", "{q}", "--top-k", "0"], "--top-k must be at least 1"),
        (["--queries", "{q}", "--output", "x.txt"], "ending in .csv / .json / .safetensors / .npz"),
        (["--queries", "{q}", "--preconditioner", "ekfac"], "fit_curvature"),
        (["--queries", "{q}", "--preconditioner", "raw", "--refine", "2"], "needs preconditioner='ekfac'"),
    ],
)
def test_query_errors_are_one_red_line(run, argv, message):
    argv = [a.format(q=run / "q.safetensors", other=run / "other.safetensors") for a in argv]
    code, text = call([str(run / "run"), *argv])
    assert code == 2
    assert text.startswith("error:") and message in text
    assert len(text.strip().splitlines()) <= 3  # one line, soft-wrapped at most


def test_query_ekfac_with_refinement(tmp_path):
    import torch
    from kfac_helpers import SeqNet, log_model, make_batches

    import logix

    torch.manual_seed(0)
    log_model(tmp_path / "run", SeqNet(), make_batches(torch.Generator().manual_seed(1)))
    store = logix.open_store(tmp_path / "run")
    queries(store.load()[:2], list(store.modules), store.fingerprint).save(tmp_path / "q.safetensors")
    code, text = call(
        [
            str(tmp_path / "run"),
            "--queries",
            str(tmp_path / "q.safetensors"),
            "--top-k",
            "3",
            "--preconditioner",
            "ekfac",
            "--refine",
            "2",
            "--output",
            str(tmp_path / "top.safetensors"),
        ]
    )
    assert code == 0, text
    assert "top-3 influence (dot, ekfac, refine 2)" in " ".join(text.split())
    top = load_result(tmp_path / "top.safetensors")
    reference = logix.InfluenceEngine(store, "ekfac", 0.1, refine=2).top_k(
        queries(store.load()[:2], list(store.modules), store.fingerprint), k=3
    )
    assert top.indices.tolist() == reference.indices.tolist()
