"""The CLI for every question: --version, top-k (and --harmful), scores, self-influence and
report, each output checked against the engine's own result; help generated from the one
source of defaults; errors as one line with exit code 2."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest
import torch
from query_helpers import build_store, mlp_modules, mlp_rows, queries
from rich.console import Console

from logix import cli
from logix.config import QueryConfig
from logix.errors import StoreError
from logix.query.engine import InfluenceEngine
from logix.query.results import load_result

COMMANDS_WITH_ENGINE = ("top-k", "scores", "report", "self-influence", "query")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    build_store(base / "run", mlp_modules(), mlp_rows(30, seed=1), [f"t{i}" for i in range(30)])
    queries(mlp_rows(3, seed=2), mlp_modules()).save(base / "q.safetensors")
    engine = InfluenceEngine(base / "run", "raw", 0.1)
    return base, engine, engine.scores(queries(mlp_rows(3, seed=2), mlp_modules()))


def call(argv: list[str]) -> tuple[int, str]:
    """Run `logix ARGV` with a recording console: (exit code, its text)."""
    console = Console(record=True, width=150, file=io.StringIO())
    args = cli.build_parser().parse_args(argv)
    code = cli.command_module(args.command).main(args, console=console)
    return code, console.export_text()


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    from logix.version import __version__

    assert capsys.readouterr().out.strip() == f"logix {__version__}"


def help_of(command: str) -> str:
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
    return " ".join(sub.format_help().split())


def test_help_is_generated_from_the_config_defaults(monkeypatch):
    for command in COMMANDS_WITH_ENGINE:
        text = help_of(command)
        for f in dataclasses.fields(QueryConfig):
            if command == "self-influence" and f.name == "mode":
                continue
            assert f"query.{f.name}" in text and f"else {f.default}" in text.split(f"query.{f.name}")[1][:60]
    assert "else auto" in help_of("top-k").split("query.fisher")[1][:20]  # not "else empirical"

    @dataclasses.dataclass
    class Other(QueryConfig):
        damping: float = 0.25

    monkeypatch.setattr("logix.commands.engine_options.QueryConfig", Other)
    assert "query.damping, else 0.25" in help_of("top-k")


def test_top_k_csv_and_harmful(run, tmp_path):
    base, engine, scores = run
    for harmful in (False, True):
        out = tmp_path / f"top-{harmful}.csv"
        argv = [
            "top-k",
            str(base / "run"),
            "--queries",
            str(base / "q.safetensors"),
            "-k",
            "4",
            "-o",
            str(out),
        ]
        code, text = call(argv + (["--harmful"] if harmful else []))
        assert code == 0, text
        want = scores.top_k(4, harmful=harmful)
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["train_id"] for r in rows] == [t for ids in want.train_ids for t in ids]
        got = torch.tensor([float(r["score"]) for r in rows]).reshape(3, 4)
        torch.testing.assert_close(got, want.values, rtol=1e-6, atol=1e-7)
        assert ("the 4 most harmful" if harmful else "top-4 influence (dot, raw)") in text


@pytest.mark.parametrize("suffix", [".safetensors", ".csv", ".json"])
def test_scores_file_holds_the_matrix(run, tmp_path, suffix):
    base, _, scores = run
    out = tmp_path / f"scores{suffix}"
    code, text = call(["scores", str(base / "run"), "--queries", str(base / "q.safetensors"), "-o", str(out)])
    assert code == 0, text
    assert "saved to" in text
    if suffix == ".csv":
        with open(out, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0][1:] == scores.train_ids
        got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
    else:
        back = load_result(out)
        assert back.train_ids == scores.train_ids and back.query_ids == scores.query_ids
        got = back.values
    assert torch.equal(got, scores.values)


def test_self_influence_table_and_json(run, tmp_path):
    base, engine, _ = run
    out = tmp_path / "si.json"
    code, text = call(["self-influence", str(base / "run"), "--top", "3", "-o", str(out)])
    assert code == 0, text
    want = engine.self_influence()
    saved = json.loads(out.read_text())
    assert saved["train_ids"] == want.train_ids and torch.equal(torch.tensor(saved["values"]), want.values)
    for tid, _ in want.top(3):
        assert f" {tid} " in text
    assert "highest self-influence (dot, raw)" in text


def test_report_with_a_renderer_file(run, tmp_path):
    base, _, scores = run
    renderer = tmp_path / "draw.py"
    renderer.write_text(
        "import logix\n\ndef draw(i):\n    return logix.render.Html(f'<i class=\"mine\">{i}</i>')\n"
    )
    out = tmp_path / "r.html"
    argv = ["report", str(base / "run"), "--queries", str(base / "q.safetensors"), "-k", "2", "-o", str(out)]
    code, text = call(argv + ["--render", f"{renderer}:draw"])
    assert code == 0, text
    page = out.read_text()
    want = [
        t for q in range(3) for t in scores.top_k(2).train_ids[q] + scores.top_k(2, harmful=True).train_ids[q]
    ]
    assert page.count('class="mine"') == 12
    assert [page.split('<i class="mine">')[j + 1].split("<")[0] for j in range(12)] == want
    code, text = call(argv[:-2] + ["-o", str(tmp_path / "x.html"), "--render", f"{renderer}:nothing"])
    assert code == 2 and "no function 'nothing'" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_one_line(run):
    base, _, _ = run
    code, text = call(
        ["top-k", str(base / "run"), "--queries", str(base / "q.safetensors"), "--device", "cuda"]
    )
    assert code == 2 and text.startswith("error: --device cuda: this machine has no CUDA device")
    assert len(text.strip().splitlines()) <= 2


def test_a_logix_error_escaping_a_command_is_one_line(monkeypatch, capsys, run):
    base, _, _ = run

    def broken(args, console=None):
        raise StoreError("the store is gone: check RUN_DIR")

    monkeypatch.setattr("logix.commands.inspect.main", broken)
    assert cli.main(["inspect", str(base / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "error: the store is gone: check RUN_DIR\n"


def test_progress_bars_of_a_command_and_quiet(run, monkeypatch):
    base, _, _ = run
    terminal = io.StringIO()
    monkeypatch.setattr("rich.console.Console", lambda *a, **k: Console(file=terminal, force_terminal=True))
    argv = ["self-influence", str(base / "run")]
    assert call(argv + ["--quiet"])[0] == 0
    assert terminal.getvalue() == ""
    assert call(argv)[0] == 0
    assert "self-influence" in terminal.getvalue() and "30/30" in terminal.getvalue()


def test_inspect_full_accepts_the_gram_cache(tmp_path):
    # 10 rows, blocks 24 and 15 wide: the raw preconditioner's Gram form, cached in
    # curvature/0/gram-raw.safetensors, which `inspect --full` called damaged
    build_store(tmp_path / "run", mlp_modules(), mlp_rows(10, seed=1))
    InfluenceEngine(tmp_path / "run", "raw", 0.1)
    assert (tmp_path / "run/curvature/0/gram-raw.safetensors").is_file()
    code, text = call(["inspect", str(tmp_path / "run"), "--full"])
    assert code == 0 and "integrity full (crc32): ok" in text, text
