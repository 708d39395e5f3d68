"""K-FAC and EK-FAC curvature in projected space (DESIGN §1).

Factors (summed by the capture hooks, `logix.capture.factors`), per module over every unmasked
position t of every example n of a segment, with N_pos positions and N_ex examples (rows):

    A = Σ x̃ x̃ᵀ  [r_in, r_in],   S = Σ g̃ g̃ᵀ  [r_out, r_out]

Normalisation. The block of a row is vec(G̃) with G̃ = Σ_t g̃_t x̃_tᵀ flattened row-major as
[r_out, r_in], so vec(g̃ x̃ᵀ) = g̃ ⊗ x̃ and the empirical Fisher E_n[vec(G̃_n) vec(G̃_n)ᵀ] is
approximated, treating positions as independent and x̃ independent of g̃, by

    F_kfac = (S / N_ex) ⊗ (A / N_pos)          (torch.kron(S / N_ex, A / N_pos), [w, w])

i.e. T̄ · E_pos[g̃g̃ᵀ] ⊗ E_pos[x̃x̃ᵀ] with T̄ = N_pos / N_ex positions per example; for one position
per example it is (S/N) ⊗ (A/N) and exact when each G̃_n is one outer product of a Kronecker-
structured distribution. With relative damping the global scale of F does not change rankings.

With A/N_pos = Q_A diag(e_A) Q_Aᵀ and S/N_ex = Q_S diag(e_S) Q_Sᵀ, F_kfac has eigenvectors
Q_S ⊗ Q_A and eigenvalues e_S[o]·e_A[i]; EK-FAC keeps the eigenvectors and refits the
eigenvalues to the stored rows: Λ_oi = (1/N) Σ_n ((Q_Sᵀ G̃_n Q_A)_oi)², by one streaming pass
(cached as `e<kind>-stream.safetensors`, e.g. `ekfac-stream`). Σ Λ = trace(F_raw), so EK-FAC's
mean eigenvalue, and hence its relative damping, equals raw's. A block only ever holds
[r_in, r_in], [r_out, r_out] and [r_out, r_in] tensors: never [w, w].

Files: `curvature/<segment>/<kind>-rNNNNN.safetensors` per writing rank (kind `kfac`, or a
variant such as `kfac.true`), float64 tensors `"<module>.A"`, `"<module>.S"`, metadata with the
kind, `rows` (N_ex), `positions` (JSON module -> N_pos) and the module table; ranks are summed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logix.curvature.covariance import (
    ProgressFn,
    Statistics,
    load_statistics,
    read_statistics,
    save_statistics,
)
from logix.curvature.eigen import eigendecompose
from logix.curvature.statistics import ids_coverage
from logix.errors import StoreError
from logix.notices import warn
from logix.store.cache import cache_keys, load_cache, rows_key, save_cache
from logix.store.format import ModuleInfo, curvature_dir

FACTOR_KIND = "kfac"
EKFAC_FORMAT = "logix-ekfac-eigenvalues"


def factor_path(run_dir: str | Path, segment: str, rank: int, kind: str = FACTOR_KIND) -> Path:
    """`curvature/<segment>/<kind>-r{rank:05d}.safetensors`."""
    return curvature_dir(Path(run_dir), segment) / f"{kind}-r{rank:05d}.safetensors"


def retire_other_ranks(run_dir: str | Path, segment: str, kind: str, world_size: int) -> None:
    """After a pass in which ranks 0..world_size-1 each replaced their own `<kind>-rNNNNN` file
    of `segment`, delete the files of higher ranks (left by an earlier run with more processes):
    the loader sums every rank's file, so a stale one would be counted twice. Call on one rank,
    after all ranks have written."""
    directory = curvature_dir(Path(run_dir), segment)
    for path in directory.glob(f"{kind}-r*.safetensors"):
        number = path.name[len(kind) + 2 : -len(".safetensors")]
        if number.isdigit() and int(number) >= world_size:
            path.unlink(missing_ok=True)


def save_factors(
    path: Path,
    modules: list[ModuleInfo],
    tensors: dict[str, torch.Tensor],
    positions: dict[str, int],
    examples: int,
    kind: str = FACTOR_KIND,
    extra: dict[str, str] | None = None,
    covers: int | None = None,
    fitted: bool = False,
) -> Path:
    """Write one rank's factor sums (`tensors`: `"<module>.A"`, `"<module>.S"` float64);
    covers: `ids_coverage` of the rows summed; fitted: summed by a statistics pass."""
    stats = Statistics(
        kind,
        list(modules),
        int(examples),
        dict(tensors),
        positions=dict(positions),
        covers=covers,
        fitted=fitted,
    )
    return save_statistics(path, stats, extra)


def read_factors(path: Path) -> Statistics | None:
    """One rank's factor file, or None when it does not exist."""
    return read_statistics(path)[0] if Path(path).exists() else None


def missing_factors_message(store: Any, kind: str = FACTOR_KIND) -> str:
    return (
        f"the store {store.path} holds no K-FAC factors ({kind}) for segment {store.segment!r} "
        f"(no {kind}-r*.safetensors in {store.curvature_dir}). Log with "
        "`curvature: {statistics: [kfac]}` in the config, or compute them for this store in a "
        f"separate pass: run = logix.init({str(store.path)!r}, resume=True); run.watch(model); "
        "with run.fit_curvature(): then `with run(data_id=ids): loss.backward()` over the "
        "training data"
    )


def load_factors(store: Any, kind: str = FACTOR_KIND) -> Statistics:
    """The summed factors of `store`'s segment; a StoreError naming the fix when there are none."""
    stats = load_statistics(store.curvature_dir, kind)
    if stats is None:
        raise StoreError(missing_factors_message(store, kind))
    if stats.modules != list(store.modules):
        raise StoreError(
            f"{stats.sources[0]} was written for another module table than the store's; "
            "delete it and compute the factors again (run.fit_curvature())"
        )
    if stats.rows == 0 or not any(stats.positions.values()):
        raise StoreError(
            f"the K-FAC factors in {store.curvature_dir} cover no examples; "
            + missing_factors_message(store, kind).split(". ", 1)[1]
        )
    exact = stats.rows == len(store)
    if exact and stats.covers is not None:
        exact = stats.covers == ids_coverage(store.data_ids)
    if not exact and stats.covers is not None and not stats.fitted:
        raise StoreError(stale_factors_message(store, stats.rows, len(store)))
    if not exact:  # a statistics pass over other data than the rows (the user's choice)
        which = "other examples than" if stats.rows == len(store) else f"{stats.rows} examples but"
        warn(
            f"the K-FAC factors of segment {store.segment!r} cover {which} the "
            f"{len(store)} rows the segment holds (a partial run or pass); they are used as an "
            "estimate. Recompute them with run.fit_curvature() for an exact match",
        )
    return stats


def stale_factors_message(store: Any, covered: int, rows: int) -> str:
    """The error of K-FAC factors logged with rows that no longer cover exactly the rows."""
    return (
        f"the K-FAC factors of segment {store.segment!r} of {store.path} were summed while "
        f"logging and cover {covered} of the {rows} rows the segment holds, not exactly them (a "
        "run resumed after a kill sums only the rows it logs itself, and the rows logged since "
        "the last save of the factors were lost with the kill): they would give wrong scores. "
        f"Recompute them over every stored row with a statistics pass: run = logix.init("
        f"{str(store.path)!r}, resume=True); run.watch(model); `with run.fit_curvature():` "
        "then `with run(data_id=ids): loss.backward()` over the training data; run.finalize()"
    )


def activation_covariance(stats: Statistics, name: str) -> torch.Tensor:
    """A / N_pos, [r_in, r_in] float64."""
    return stats.tensors[f"{name}.A"] / max(stats.positions.get(name, 0), 1)


def gradient_covariance(stats: Statistics, name: str) -> torch.Tensor:
    """S / N_ex, [r_out, r_out] float64."""
    return stats.tensors[f"{name}.S"] / max(stats.rows, 1)


def _factor_matrix(stats: Statistics):
    def matrix(key: str) -> torch.Tensor:
        name, side = key.rsplit(".", 1)
        return activation_covariance(stats, name) if side == "A" else gradient_covariance(stats, name)

    return matrix


@dataclass
class KroneckerBases:
    """Eigenpairs of A/N_pos (e_A [r_in], Q_A [r_in, r_in]) and S/N_ex (e_S [r_out], Q_S)."""

    e_in: torch.Tensor
    q_in: torch.Tensor
    e_out: torch.Tensor
    q_out: torch.Tensor

    def kfac_eigenvalues(self) -> torch.Tensor:
        """e_S[o]·e_A[i], [r_out, r_in] float64: the eigenvalues of (S/N_ex) ⊗ (A/N_pos)."""
        return torch.outer(self.e_out, self.e_in)


def factor_eigenbases(
    stats: Statistics, names: list[str], cache_path: Path | None, device: torch.device | str = "cpu"
) -> dict[str, KroneckerBases]:
    """Eigenbases of both factors of every module in `names` (float64, cached on disk)."""
    keys = [f"{n}.{side}" for n in names for side in ("A", "S")]
    eig = eigendecompose(stats, keys, cache_path, device, matrix=_factor_matrix(stats))
    return {n: KroneckerBases(*eig[f"{n}.A"], *eig[f"{n}.S"]) for n in names}


def rotate(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """leftᵀ X right for every X in x [n, a, b] (left [a, a'], right [b, b']) -> [n, a', b'].

    Two plain GEMMs over the stacked rows (no batched small products)."""
    n, a, b = x.shape
    y = (x.reshape(n * a, b) @ right).view(n, a, right.shape[1])
    y = y.transpose(1, 2).reshape(-1, a) @ left  # [n·b', a']
    return y.view(n, right.shape[1], left.shape[1]).transpose(1, 2)


def ekfac_eigenvalues(
    rows: Any,
    stats: Statistics,
    bases: dict[str, KroneckerBases],
    names: list[str],
    *,
    chunk_rows: int = 4096,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    cache_path: Path | None = None,
) -> dict[str, torch.Tensor]:
    """Λ_m = (1/N) Σ_n (Q_Sᵀ G̃_n Q_A)² per module in `names`: [r_out, r_in] float64 on CPU.

    rows: a `Store` (its `iter_chunks`, `shards` and `modules`). One streaming pass computes
    every module missing from the cache at `cache_path`, keyed by the rows' content
    (`store.cache.rows_key`) and the digests of the factors that gave the bases (float64
    arithmetic on `device`).
    """
    modules = {m.name: m for m in rows.modules}
    content = rows_key(rows)

    def key(n: str) -> str:
        return f"{content}:{stats.digest(n + '.A')}:{stats.digest(n + '.S')}"

    cached, tensors = _cached_eigenvalues(cache_path)
    result = {n: tensors[f"{n}.eigenvalues"] for n in names if cached.get(n) == key(n)}
    missing = [n for n in names if n not in result]
    if not missing:
        return result
    device = torch.device(device)
    qs = {n: (bases[n].q_out.to(device), bases[n].q_in.to(device)) for n in missing}
    sums = {
        n: torch.zeros(modules[n].r_out, modules[n].r_in, dtype=torch.float64, device=device) for n in missing
    }
    total, done = len(rows), 0
    for _, x in rows.iter_chunks(rows=chunk_rows, dtype=torch.float32):
        x = x.to(device)
        for n in missing:
            m = modules[n]
            g = x[:, m.columns].to(torch.float64).view(-1, m.r_out, m.r_in)
            sums[n] += rotate(g, *qs[n]).square().sum(dim=0)
        done += x.shape[0]
        if progress is not None:
            progress("ekfac", done, total)
    for n in missing:
        result[n] = (sums[n] / max(done, 1)).cpu()
    if cache_path is not None:
        # Keep still-valid entries of other modules, then replace the cache.
        keep = {
            n: tensors[f"{n}.eigenvalues"]
            for n, k in cached.items()
            if n not in result and f"{n}.A" in stats.tensors and k == key(n)
        }
        entries = {**keep, **result}
        save_cache(
            cache_path,
            {f"{n}.eigenvalues": t for n, t in entries.items()},
            {
                "format": EKFAC_FORMAT,
                "kind": stats.kind,
                "rows": str(done),
                "keys": json.dumps({n: key(n) for n in entries}),
            },
        )
    return result


def _cached_eigenvalues(cache_path: Path | None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(module -> key it was computed for, tensors) of a valid EK-FAC cache, else empty (a
    damaged cache, or one failing its checksum, is recomputed)."""
    found = None if cache_path is None else load_cache(cache_path, EKFAC_FORMAT)
    if found is None:
        return {}, {}
    tensors, md = found
    return {n: k for n, k in cache_keys(md).items() if f"{n}.eigenvalues" in tensors}, tensors


@dataclass
class KroneckerBlock:
    """(F + λI)⁻¹ of one module with F = (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ.

    Λ [r_out, r_in] is e_S e_Aᵀ (kfac) or the refitted eigenvalues (ekfac). Applied to a row
    block G [r_out, r_in] as Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ.
    """

    module: ModuleInfo
    q_in: torch.Tensor  # [r_in, r_in]
    q_out: torch.Tensor  # [r_out, r_out]
    eigenvalues: torch.Tensor  # [r_out, r_in], clamped at 0
    damping: float

    def to(self, device: torch.device | str, dtype: torch.dtype) -> KroneckerBlock:
        return KroneckerBlock(
            self.module,
            self.q_in.to(device, dtype),
            self.q_out.to(device, dtype),
            self.eigenvalues.to(device, dtype),
            self.damping,
        )

    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return rotate(x.reshape(-1, m.r_out, m.r_in), self.q_out, self.q_in)

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """q [n, w] -> q (F + λI)⁻¹ [n, w] (F is symmetric), in q's dtype."""
        r = self._rotated(q) / (self.eigenvalues + self.damping)
        return rotate(r, self.q_out.T, self.q_in.T).reshape(q.shape[0], -1)

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """y [n, w] with ‖y‖² = xᵀ(F + λI)⁻¹x per row: the rotated block over √(Λ + λ)."""
        return (self._rotated(x) * (self.eigenvalues + self.damping).rsqrt()).reshape(x.shape[0], -1)
