"""True-Fisher (Gauss–Newton) statistics: their files, loaders and the EK-FAC eigenvalues.

A `run.fit_curvature(fisher="true")` pass (`fit.py`) backpropagates pseudo-gradients whose outer
products sum to the Fisher under the model's own predictive distribution, and saves per segment
and rank, next to the empirical statistics and in the same format:

    raw.true-rNNNNN.safetensors     Σ vec(G̃) vec(G̃)ᵀ per module (as `raw`), rows = examples
    kfac.true-rNNNNN.safetensors    A = Σ x̃x̃ᵀ (once per position) and S = Σ g̃g̃ᵀ over every
                                    pseudo output-gradient (as `kfac`): F ≈ (S/N_ex) ⊗ (A/N_pos)
    ekfac.true-rNNNNN.safetensors   Σ (Q_Sᵀ G̃ Q_A)² per module [r_out, r_in] over the pseudo
                                    rows, for the eigenbases Q_A, Q_S of the kfac.true factors
                                    that a previous pass saved (metadata "bases" names them)

None of them can be recomputed from the stored rows (those are empirical gradients), so a
missing file is an error naming the pass. EK-FAC eigenvalues Λ_oi = (q_S,o ⊗ q_A,i)ᵀ F (q_S,o ⊗
q_A,i) come from `ekfac.true` when it matches the current bases, else exactly from `raw.true`
(narrow blocks), else the error names the second pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from logix.curvature.covariance import Statistics, load_statistics, read_statistics
from logix.curvature.kfac import KroneckerBases, rotate
from logix.errors import StoreError
from logix.notices import warn
from logix.store.format import ModuleInfo

SUFFIX = ".true"


def true_kind(kind: str) -> str:
    """The statistics kind of the true-Fisher variant of `kind` ("raw" -> "raw.true")."""
    return kind + SUFFIX


def _pass_hint(statistics: str) -> str:
    return (
        f"They need the model: reopen the store with run = logix.init(run_dir, resume=True); "
        f"run.watch(model) at this segment's checkpoint, then `with run.fit_curvature("
        f'fisher="true", statistics=[{statistics!r}]) as fit:` over training batches '
        f"(`with fit(data_id=ids): fit.backward(model(x))`)"
    )


def _load(store: Any, kind: str, statistics: str) -> Statistics:
    name = true_kind(kind)
    directory = Path(store.curvature_dir)
    stats = load_statistics(directory, name)
    if stats is None or stats.rows == 0:
        raise StoreError(
            f"segment {store.segment!r} of {store.path} has no true-Fisher {kind!r} "
            f"statistics ({directory}/{name}-r*.safetensors). " + _pass_hint(statistics)
        )
    if stats.modules != list(store.modules):
        raise StoreError(
            f"{stats.sources[0]} was computed for another module table than the "
            f"store's; run the fit_curvature pass again"
        )
    return stats


def true_raw_statistics(store: Any) -> Statistics:
    """`raw.true` of the store's segment, summed over ranks: F = S / N over the pass's examples
    (which may be a subset of the training data)."""
    return _load(store, "raw", "raw")


def true_factors(store: Any) -> Statistics:
    """`kfac.true` factors of the store's segment, summed over ranks."""
    stats = _load(store, "kfac", "kfac")
    if not any(stats.positions.values()):
        raise StoreError(
            f"the true-Fisher K-FAC factors in {store.curvature_dir} cover no positions. "
            + _pass_hint("kfac")
        )
    return stats


def bases_key(factors: Statistics, name: str) -> str:
    """Which factors a module's eigenbases came from (content digests of A and S)."""
    return f"{factors.digest(name + '.A')}:{factors.digest(name + '.S')}"


def true_ekfac_eigenvalues(
    store: Any, factors: Statistics, bases: dict[str, KroneckerBases], names: list[str]
) -> dict[str, torch.Tensor]:
    """Λ_m [r_out, r_in] float64 per module in `names` for the kfac.true eigenbases `bases`."""
    directory = Path(store.curvature_dir)
    refitted = load_statistics(directory, true_kind("ekfac"))
    keys: dict[str, str] = {}
    if refitted is not None:
        per_rank = [json.loads(read_statistics(Path(s))[1].get("bases", "{}")) for s in refitted.sources]
        keys = per_rank[0] if all(k == per_rank[0] for k in per_rank) else {}  # else: none usable
    raw = None
    out = {}
    for n in names:
        if refitted is not None and keys.get(n) == bases_key(factors, n):
            out[n] = refitted.tensors[n] / max(refitted.rows, 1)
            continue
        if raw is None:
            try:
                raw = true_raw_statistics(store)
            except StoreError:
                raise StoreError(
                    f"segment {store.segment!r} of {store.path} has no true-Fisher EK-FAC eigenvalues "
                    f"for the current kfac.true factors of module {n!r}: run a second pass after the "
                    f'one that saved the factors, `with run.fit_curvature(fisher="true", '
                    f"statistics=['ekfac']) as fit:` over the same batches (or collect 'raw' as well "
                    f"in the first pass: for blocks up to 8192 wide the eigenvalues follow from it)"
                ) from None
        m = next(mod for mod in store.modules if mod.name == n)
        out[n] = eigenvalues_from_raw(raw.fisher(n), bases[n], m)
    return out


def eigenvalues_from_raw(fisher: torch.Tensor, bases: KroneckerBases, m: ModuleInfo) -> torch.Tensor:
    """Λ_oi = (q_S,o ⊗ q_A,i)ᵀ F (q_S,o ⊗ q_A,i): the diagonal of F [w, w] in the Kronecker
    eigenbasis, [r_out, r_in] float64. F R is two rotations of F's rows (no [w, w] × [w, w]
    product), but R = Q_S ⊗ Q_A and F R are [w, w] float64 each: 1 GiB at w = 8192, the widest
    raw block."""
    w = m.width
    f_r = rotate(fisher.reshape(w, m.r_out, m.r_in), bases.q_out, bases.q_in).reshape(w, w)  # F R
    r = torch.kron(bases.q_out, bases.q_in)  # R = Q_S ⊗ Q_A, columns (o, i) row-major
    return (r * f_r).sum(dim=0).reshape(m.r_out, m.r_in)


class EigenvalueSums:
    """Σ_rows (Q_Sᵀ G̃ Q_A)² per module [r_out, r_in] float64, for given eigenbases."""

    def __init__(self, modules: list[ModuleInfo], bases: dict[str, KroneckerBases]):
        self.modules = list(modules)
        self.bases = {n: (b.q_out, b.q_in) for n, b in bases.items()}
        self.sums = {m.name: torch.zeros(m.r_out, m.r_in, dtype=torch.float64) for m in modules}

    def update(self, rows: torch.Tensor) -> None:
        """Add pseudo-gradient rows [n, D]."""
        for m in self.modules:
            g = rows[:, m.columns].to(torch.float64).reshape(-1, m.r_out, m.r_in)
            self.sums[m.name] += rotate(g, *self.bases[m.name]).square().sum(dim=0)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.sums


def held_fisher(store: Any, preconditioner: str, asked: str | None) -> str:
    """The Fisher a query uses: `asked` when given; else "true" when the store's segment holds
    the true-Fisher statistics that `preconditioner` reads (a one-line notice says so), else
    "empirical". identity reads no statistics: always "empirical"."""
    if asked not in (None, "auto") or preconditioner == "identity":
        return "empirical" if asked in (None, "auto") else asked
    needed = "raw" if preconditioner == "raw" else "kfac"
    directory = Path(store.curvature_dir)
    if not any(directory.glob(f"{true_kind(needed)}-r*.safetensors")):
        return "empirical"
    warn(
        f"{store.path}, segment {store.segment!r} holds true-Fisher {needed} statistics: "
        "the engine uses them (pass fisher='empirical' for the stored rows' own)",
    )
    return "true"
