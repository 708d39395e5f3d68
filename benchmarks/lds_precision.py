"""Do the `raw` preconditioner's precision choices change the digits LDS? (issue #14)

The engine's automatic form (fc1, 4,096 wide > N = 1,397: the Gram form with float32 N²w
products and float32 scoring; fc2: float64 eigendecomposition) against two all-float64
references of the same damped Fisher: the Gram form with float64 products (`form="gram"`) and
the eigendecomposition form (`form="eigen"`), each scored as a float64 product with the rows.
Same r=64 store, queries and retraining ground truth for all three (paired differences).

    python benchmarks/lds_precision.py [--subsets 30 --seeds 2]   # retraining cached under
                                                                  # examples/digits/out/lds/
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import logix
from logix.curvature.precondition import build_preconditioner
from logix.eval import lds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))

from common import HERE, load_digits, retrained_test_losses, train_mlp  # noqa: E402
from lds import log_store, query_gradients  # noqa: E402


def float64_scores(store, q: torch.Tensor, damping: float, form: str) -> torch.Tensor:
    """Q (F + λI)⁻¹ Xᵀ [n_q, N] with the preconditioner of `form`, everything in float64."""
    pre = build_preconditioner(store, "raw", damping, form=form)
    return pre.apply(q.double()) @ store.load(dtype=torch.float64).T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subsets", type=int, default=30)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    args = p.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    x_test, y_test = data.x_test[: args.n_test], data.y_test[: args.n_test]
    model = train_mlp(data.x_train, data.y_train, epochs=args.epochs, seed=0)
    out = HERE / "out" / "lds"
    subsets, outputs = retrained_test_losses(
        data, args.n_test, subsets=args.subsets, seeds=args.seeds, epochs=args.epochs, out_dir=out
    )
    projection = {"kind": "random", "rank_in": 64, "rank_out": 64, "seed": 0}
    with tempfile.TemporaryDirectory() as tmp:
        store = log_store(Path(tmp) / "r64", model, data.x_train, data.y_train, projection)
        q = query_gradients(Path(tmp) / "r64", model, x_test, y_test)
        forms = sorted({type(b).__name__ for b in build_preconditioner(store, "raw", 0.1).blocks.values()})
        print(f"store r=64: N={len(store)}, D={store.width}; automatic form's blocks: {forms}")
        for d in args.dampings:
            auto = logix.InfluenceEngine(store, "raw", damping=d).scores(q).values
            gram = float64_scores(store, q.values, d, "gram")
            eigen = float64_scores(store, q.values, d, "eigen")
            named = {"auto": auto, "gram": gram, "eigen": eigen}
            res = {k: lds(s, subsets, outputs, output="loss").mean for k, s in named.items()}
            rel = float((auto.double() - gram).norm() / gram.norm())
            print(
                f"λ={d:g}: LDS auto {res['auto']:+.4f}, gram float64 {res['gram']:+.4f}, "
                f"eigen float64 {res['eigen']:+.4f}; auto − gram {res['auto'] - res['gram']:+.2e}, "
                f"auto − eigen {res['auto'] - res['eigen']:+.2e}; ‖auto − gram‖/‖gram‖ {rel:.1e}"
            )


if __name__ == "__main__":
    main()
