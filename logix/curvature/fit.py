"""The true-Fisher statistics pass: `with run.fit_curvature(fisher="true") as fit:`.

    with run.fit_curvature(fisher="true", statistics=["raw", "kfac"]) as fit:
        for ids, x in batches:
            with fit(data_id=ids):               # mask=: the padding mask, as in `run(...)`
                fit.backward(model(x))           # label_mask=: target positions of [B, T, V] logits

This file holds the sums and their files; the pass itself is `logix.run.passes`. Inside a block
the run's own capture hooks watch one forward pass; `fit.backward(logits)` then
backpropagates, one pass per class slot (and position), the logit-gradients of
`capture.fisher.fisher_logit_grads` with `torch.autograd.grad` to the watched layers' outputs
only. Each pass yields pseudo-gradient rows G̃_{n,c} [B, D] with the same projections, bias and
mask conventions as logged rows; they are never stored, only summed per kind:

- `raw`: Σ vec(G̃) vec(G̃)ᵀ per module (blocks up to 8192 wide);
- `kfac`: the hooks' K-FAC factors, A = Σ x̃x̃ᵀ once per forward position and S = Σ g̃g̃ᵀ over
  every pseudo output-gradient;
- `ekfac`: Σ (Q_Sᵀ G̃ Q_A)² for the eigenbases of the `kfac.true` factors an earlier pass saved
  (so EK-FAC takes two passes: statistics=["kfac"], then statistics=["ekfac"]).

They are saved on exit as `curvature/<segment>/<kind>.true-rNNNNN.safetensors` (replacing this
rank's previous ones), with rows = the examples seen. The row scale is that of a per-example
loss summed over its target positions (the loop's `loss_reduction` does not apply: the pass
builds each example's logit-gradients itself).

Cost: K backward passes per batch for classification (K = C for mass 1), T·K for sequences,
each as costly as the batch's own backward without weight gradients: meant for small models or
for a subset of the training data. Parameters, their `.grad` and `requires_grad` are never
touched (`autograd.grad` to the layer outputs computes no weight gradient). Put the model in
`eval()` mode first if it has dropout: the pass takes one forward and many backward passes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from logix.capture.factors import KroneckerSums
from logix.comm import barrier
from logix.curvature.covariance import (
    ACCUMULATORS,
    Statistics,
    load_statistics,
    save_statistics,
)
from logix.curvature.kfac import (
    factor_eigenbases,
    factor_path,
    retire_other_ranks,
    save_factors,
)
from logix.curvature.true_fisher import EigenvalueSums, bases_key, true_kind
from logix.errors import CaptureError, StoreError
from logix.store.format import ModuleInfo, curvature_dir, total_width

KINDS = ("raw", "kfac", "ekfac")
RowsFn = Callable[[list, torch.Tensor], None]  # (data ids, pseudo-gradient rows [n, D])


class TrueFisherStatistics:
    """The sums of one true-Fisher pass over some batches of a store's segment; see the module
    doc. The pass (`logix.run`) feeds it: `add_rows` per backward pass, `add_batch` per block.
    After the pass: `examples`, `pseudo_rows`, `passes`, `positions`, `dropped_mass` and the
    files in `paths`."""

    def __init__(
        self,
        run_dir: Path,
        segment: str,
        modules: list[ModuleInfo],
        *,
        rank: int = 0,
        world_size: int = 1,
        statistics: tuple[str, ...] = ("raw",),
        mass: float = 1.0,
        on_rows: RowsFn | None = None,
    ):
        if not 0.0 < float(mass) <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        kinds = list(dict.fromkeys(statistics))
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown true-Fisher statistics {kind!r}; choose from {list(KINDS)}")
        if "kfac" in kinds and "ekfac" in kinds:
            raise ValueError(
                "'ekfac' needs the eigenbases of the K-FAC factors of an earlier pass: "
                "run one pass with statistics=['kfac'], then one with ['ekfac'] (or "
                "collect 'raw' with 'kfac': for blocks up to 8192 wide the EK-FAC "
                "eigenvalues follow from raw exactly)"
            )
        if not kinds and on_rows is None:
            raise ValueError("nothing to compute: give statistics (e.g. ['raw']) or on_rows")
        self.run_dir = Path(run_dir)
        self.segment = segment
        self.rank, self.world_size = int(rank), int(world_size)
        self.modules = list(modules)
        self.width = total_width(self.modules)
        self.mass = float(mass)
        self.on_rows = on_rows
        self.kinds = kinds
        self.accumulators: dict[str, Any] = {}
        if "raw" in kinds:
            self.accumulators["raw"] = ACCUMULATORS["raw"](self.modules)
        self._bases: dict[str, str] = {}
        if "ekfac" in kinds:
            self.accumulators["ekfac"] = self._eigenvalue_sums()
        dims = {m.name: (m.r_in, m.r_out) for m in self.modules}
        self.factors = KroneckerSums(dims) if "kfac" in kinds else None
        self.pending = KroneckerSums(dims, dtype=torch.float32) if "kfac" in kinds else None  # a block's
        self.rows_wanted = bool(self.accumulators) or on_rows is not None
        self.examples = 0
        self.pseudo_rows = 0
        self.passes = 0
        self.positions = 0
        self.dropped_mass_sum = 0.0
        self.paths: list[Path] = []
        self._ids: set = set()

    def _eigenvalue_sums(self) -> EigenvalueSums:
        directory = curvature_dir(self.run_dir, self.segment)
        factors = load_statistics(directory, true_kind("kfac"))
        if factors is None or factors.modules != self.modules:
            raise StoreError(
                f"statistics=['ekfac'] needs the true-Fisher K-FAC factors of segment "
                f"{self.segment!r} first (no matching kfac.true-r*.safetensors in {directory}): run "
                "a pass with run.fit_curvature(fisher='true', statistics=['kfac']) before this one"
            )
        names = [m.name for m in self.modules]
        bases = factor_eigenbases(factors, names, directory / f"eigen-{true_kind('kfac')}.safetensors")
        self._bases = {n: bases_key(factors, n) for n in names}
        return EigenvalueSums(self.modules, bases)

    @property
    def dropped_mass(self) -> float:
        """The mean probability mass left out per target position (0 for mass = 1)."""
        return self.dropped_mass_sum / max(self.positions, 1)

    def count(self, passes: int, positions: int, dropped_mass: float) -> None:
        """Count one `backward(logits)` of a block: its backward passes, its target positions
        and the probability mass it left out over them."""
        self.passes += passes
        self.positions += positions
        self.dropped_mass_sum += dropped_mass

    def add_rows(self, ids: list, rows: torch.Tensor) -> None:
        """One backward pass's pseudo-gradient rows [n, D] (examples with a nonzero ℓ)."""
        if not bool(torch.isfinite(rows).all()):
            raise CaptureError("non-finite pseudo-gradients (NaN/inf): check the model's logits")
        cpu = rows.cpu()
        for acc in self.accumulators.values():
            acc.update(cpu)
        if self.on_rows is not None:
            self.on_rows(ids, rows)
        self.pseudo_rows += rows.shape[0]

    def add_batch(self, ids: list) -> None:
        """A finished block: its examples enter the Fisher once, with its pending factor sums."""
        dups = [i for i in ids if i in self._ids]
        if dups:
            raise CaptureError(
                f"data id(s) {dups[:10]} were already seen in this pass: each "
                "example must enter the Fisher once"
            )
        if self.pending is not None:
            self.pending.commit(self.factors, len(ids))
        self._ids.update(ids)
        self.examples += len(ids)

    def statistics(self, kind: str = "raw") -> Statistics:
        """The summed true-Fisher statistics of `kind` so far, over `examples` rows."""
        if kind == "kfac":
            return Statistics(
                true_kind(kind),
                self.modules,
                self.examples,
                self.factors.tensors(),
                positions=self.factors.position_counts(),
            )
        return Statistics(
            true_kind(kind), self.modules, self.examples, dict(self.accumulators[kind].tensors())
        )

    def save(self) -> list[Path]:
        """Write `curvature/<segment>/<kind>.true-r<rank>.safetensors` for every kind (replacing
        this rank's previous pass); returns the paths."""
        if self.examples == 0:
            raise CaptureError(
                "the curvature pass saw no batch: inside `with run.fit_curvature("
                "fisher='true') as fit:` run `with fit(data_id=ids): fit.backward(model(x))`"
            )
        rank = self.rank
        extra = {
            "segment": self.segment,
            "rank": str(rank),
            "fisher": "true",
            "mass": repr(self.mass),
            "pseudo_rows": str(self.pseudo_rows),
            "positions_seen": str(self.positions),
            "dropped_mass": repr(self.dropped_mass),
        }
        self.paths = []
        for kind in self.kinds:
            path = factor_path(self.run_dir, self.segment, rank, true_kind(kind))
            stats = self.statistics(kind)
            if kind == "kfac":
                self.paths.append(
                    save_factors(
                        path,
                        self.modules,
                        stats.tensors,
                        stats.positions,
                        stats.rows,
                        kind=stats.kind,
                        extra=extra,
                    )
                )
            else:
                more = {"bases": json.dumps(self._bases)} if kind == "ekfac" else {}
                self.paths.append(save_statistics(path, stats, {**extra, **more}))
        # Every rank has written before any reads (the ekfac pass reads all kfac.true files)
        # or a stale file of a rank beyond this pass is deleted.
        barrier()
        if rank == 0:
            for kind in self.kinds:
                retire_other_ranks(self.run_dir, self.segment, true_kind(kind), self.world_size)
        return self.paths
