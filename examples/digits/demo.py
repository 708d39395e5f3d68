"""The logix demo: which training images made an MLP classify these test digits as it did?

    bash scripts/demo.sh            # or: python examples/digits/demo.py [--out DIR] [--epochs N]

1. trains an MLP 64-256-10 on 1,397 8×8 digits, logging LoGra gradients (r = 64×64 per layer)
   during the last epoch of real training: three added lines in the loop (see common.py);
2. prints the store's summary (`logix inspect`);
3. captures the gradients of a few test images in a query-mode run (saved as
   `queries.safetensors`), scores them against every training image with the `raw`
   preconditioner, and prints / draws the most helpful and most harmful training images for
   each: `report.html` (any browser) and `report.png` (needs the optional matplotlib);
4. prints the `logix` commands that ask the same store more questions from a shell.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import accuracy, load_digits, train_mlp  # noqa: E402
from figure import draw_report  # noqa: E402
from render import test_image, train_image  # noqa: E402

import logix  # noqa: E402
from logix.cli import main as logix_cli  # noqa: E402

CONFIG = {
    "projection": {"kind": "random", "rank_in": 64, "rank_out": 64, "seed": 0},
    "capture": {"loss_reduction": "mean"},
}


def pick_queries(model, data, n: int) -> list[int]:
    """A few test images: mostly correct ones of different classes, and the misclassified."""
    with torch.no_grad():
        pred = model(data.x_test).argmax(1)
    wrong = (pred != data.y_test).nonzero().flatten().tolist()
    chosen = wrong[: max(1, n // 3)]
    for digit in range(10):
        if len(chosen) >= n:
            break
        right = ((pred == data.y_test) & (data.y_test == digit)).nonzero().flatten().tolist()
        if right:
            chosen.append(right[0])
    return chosen[:n]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="output folder")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--queries", type=int, default=6, help="how many test images to explain")
    ap.add_argument("--k", type=int, default=4, help="training images shown per side")
    ap.add_argument("--mode", default="relative", choices=["dot", "cosine", "relative"])
    args = ap.parse_args(argv)
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    data = load_digits()

    # 1. Train, logging the last epoch (the loop's three added lines live in train_mlp).
    t0 = time.perf_counter()
    with logix.init(run_dir, config=CONFIG, overwrite=True) as run:
        model = train_mlp(data.x_train, data.y_train, epochs=args.epochs, run=run)
    console.print(
        f"[bold]1. trained[/] {args.epochs} epochs and logged the last one in "
        f"{time.perf_counter() - t0:.1f} s; test accuracy "
        f"{accuracy(model, data.x_test, data.y_test):.1%}"
    )

    # 2. What is in the store.
    console.print("[bold]2. the store[/] (logix inspect)")
    logix_cli(["inspect", str(run_dir)])

    # 3. Query a few test images.
    t0 = time.perf_counter()
    queries = pick_queries(model, data, args.queries)
    query = logix.init(run_dir, mode="query")
    query.watch(model)
    with query(data_id=queries):
        F.cross_entropy(model(data.x_test[queries]), data.y_test[queries]).backward()
    grads = query.gradients()
    grads.save(out / "queries.safetensors")  # for `logix top-k` / `logix report` from a shell
    engine = logix.InfluenceEngine(logix.open_store(run_dir), preconditioner="raw", damping=0.1)
    result = engine.scores(grads, mode=args.mode)
    # Columns follow the store's row order (the order rows were logged in): map them to data
    # ids, here the training-set indices, so that scores[r, i] is training image i.
    columns = torch.tensor(result.train_ids)
    scores = torch.empty_like(result.values)
    scores[:, columns] = result.values
    helpful = scores.argsort(dim=1, descending=True, stable=True)[:, : args.k]
    harmful = scores.argsort(dim=1, stable=True)[:, : args.k]
    with torch.no_grad():
        preds = model(data.x_test[queries]).argmax(1).tolist()
    console.print(
        f"[bold]3. influence[/] of {len(data.y_train)} training images on {len(queries)} "
        f"test images ({args.mode}, raw preconditioner) in {time.perf_counter() - t0:.1f} s "
        "(includes the one-off curvature pass)"
    )
    table = Table(
        title="most helpful (+) and most harmful (-) training images",
        caption="#id (label) score ÷ that test image's largest |score|: rows compare; "
        f"raw {args.mode} scores are in report.html",
    )
    for col in ("test image", "label / pred", "most helpful", "most harmful"):
        table.add_column(col)
    for r, q in enumerate(queries):
        peak = float(scores[r].abs().max()) or 1.0

        def fmt(idx, r=r, peak=peak):
            return ", ".join(f"#{int(i)} ({int(data.y_train[i])}) {scores[r, i] / peak:+.2f}" for i in idx)

        mark = "" if preds[r] == int(data.y_test[q]) else " [red]✗[/]"
        table.add_row(f"#{q}", f"{int(data.y_test[q])} / {preds[r]}{mark}", fmt(helpful[r]), fmt(harmful[r]))
    console.print(table)
    predicted = dict(zip(queries, preds))
    page = result.report(
        out / "report.html",
        k=args.k,
        render=train_image,
        render_query=lambda q: test_image(q, predicted[q]),
        title="Which training digits made the MLP classify these test digits as it did?",
    )
    console.print(f"report written to [bold]{page}[/] (open it in a browser)")
    png = out / "report.png"
    if draw_report(png, data, queries, preds, scores, helpful, harmful):
        console.print(f"picture written to [bold]{png}[/]")
    else:
        console.print("matplotlib is not installed (pip install 'logix[plot]'): no report.png")

    # 4. The same store from a shell.
    console.print("[bold]4. ask more from a shell[/] (`python -m logix` works as `logix`):")
    for line in shell_commands(run_dir, out / "queries.safetensors", out / "report-cli.html"):
        console.print(f"  {line}", highlight=False, soft_wrap=True)


def shell_commands(run_dir: Path, queries: Path, page: Path) -> list[str]:
    """The `logix` commands for this store, with paths as typed from the current directory."""
    here = Path(__file__).resolve().parent

    def shown(p: Path) -> str:
        p = Path(p).resolve()
        try:
            return shlex.quote(str(p.relative_to(Path.cwd())))
        except ValueError:
            return shlex.quote(str(p))

    draw = shown(here / "render.py")
    return [
        f"logix inspect {shown(run_dir)}",
        f"logix top-k {shown(run_dir)} --queries {shown(queries)} -k 5",
        f"logix top-k {shown(run_dir)} --queries {shown(queries)} -k 5 --harmful "
        f"-o {shown(page.with_name('harmful.csv'))}",
        f"logix self-influence {shown(run_dir)} --top 10",
        f"logix report {shown(run_dir)} --queries {shown(queries)} --render {draw}:train_image "
        f"--render-query {draw}:test_image -o {shown(page)}",
    ]


if __name__ == "__main__":
    main()
