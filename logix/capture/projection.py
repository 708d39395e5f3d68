"""LoGra projections: the fixed matrices P_in [r_in, d_in] and P_out [r_out, d_out] of a module.

A side whose requested rank is at or above its dimension is kept whole (no matrix, r = d) and
the clamp is noted, so one config serves layers of every width. `identity` keeps both sides
whole: exact per-example gradients. `random` draws a seeded Gaussian scaled by 1/sqrt(r), seeded
per module name so that adding or removing a module does not change the others' projections.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from logix.errors import StoreError
from logix.store.format import write_atomic
from logix.store.tagged import read_tagged


@dataclass
class SideProjection:
    """One side (input or output) of a module's projection; `matrix` is None when kept whole."""

    dim: int
    rank: int
    matrix: torch.Tensor | None  # [rank, dim] float32

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> [..., rank]."""
        if self.matrix is None:
            return v
        if self.matrix.device != v.device:
            self.matrix = self.matrix.to(v.device)
        return v @ self.matrix.T

    def bias_split(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(P[:, -1] [rank], P[:, :-1]ᵀ [dim - 1, rank]) on `device`: an input side whose last
        column multiplies the bias's 1, as views made once rather than at every call."""
        if self.matrix.device != device:
            self.matrix = self.matrix.to(device)
        split = self.__dict__.get("_split")
        if split is None or split[0] is not self.matrix:
            split = (self.matrix, self.matrix[:, -1], self.matrix[:, :-1].T)
            self._split = split
        return split[1], split[2]


@dataclass
class ModuleProjection:
    p_in: SideProjection
    p_out: SideProjection


def _module_seed(seed: int, name: str, side: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{side}".encode())) % (2**63 - 1)


def whole_side(name: str, side: str, dim: int, rank: int, notes: list[str]) -> SideProjection | None:
    """The side kept whole (no matrix, r = d) when `rank` reaches `dim`, noted; else None."""
    if rank < dim:
        return None
    notes.append(f"{name}: rank_{side} {rank} >= d_{side} {dim}, side kept whole (r_{side} = {dim})")
    return SideProjection(dim, dim, None)


def make_side(
    kind: str, name: str, side: str, dim: int, rank: int, seed: int, notes: list[str]
) -> SideProjection:
    """Build one side; clamps `rank` to `dim` (keeping the side whole) with a note."""
    if kind == "identity":
        return SideProjection(dim, dim, None)
    whole = whole_side(name, side, dim, rank, notes)
    if whole is not None:
        return whole
    if kind != "random":
        raise ValueError(f"unknown projection kind {kind!r}; use 'identity' or 'random'")
    return SideProjection(dim, rank, gaussian_matrix(seed, name, side, rank, dim))


def gaussian_matrix(seed: int, name: str, side: str, rank: int, dim: int) -> torch.Tensor:
    """The seeded Gaussian [rank, dim] float32 scaled by 1/sqrt(rank) of one module side."""
    gen = torch.Generator().manual_seed(_module_seed(seed, name, side))
    return torch.randn(rank, dim, generator=gen, dtype=torch.float32) / rank**0.5


def projections_bytes(projections: dict[str, ModuleProjection]) -> bytes:
    """Serialise the matrices (safetensors, keys '<module>.in' / '<module>.out')."""
    tensors = {}
    for name, p in projections.items():
        for side, sp in (("in", p.p_in), ("out", p.p_out)):
            if sp.matrix is not None:
                tensors[f"{name}.{side}"] = sp.matrix.detach().to("cpu").contiguous()
    return save(tensors, metadata={"format": "logix-projections"})


def save_projections(path: Path, projections: dict[str, ModuleProjection]) -> str:
    """Write the projections atomically; returns the sha256 of the file (part of the fingerprint)."""
    data = projections_bytes(projections)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return hashlib.sha256(data).hexdigest()


def load_projections(path: Path, dims: dict[str, tuple[int, int, int, int]]) -> dict[str, ModuleProjection]:
    """Read the projections of a store. dims: name -> (d_in, d_out, r_in, r_out) from the manifest."""
    try:
        tensors, _ = read_tagged(
            path, "logix-projections", "a logix projections file", "the store's projections are damaged"
        )
    except FileNotFoundError:
        raise StoreError(
            f"{path} is missing: the store's projections are lost, it cannot be extended "
            "or queried with new gradients"
        ) from None
    out = {}
    for name, (d_in, d_out, r_in, r_out) in dims.items():
        sides = []
        for side, d, r in (("in", d_in, r_in), ("out", d_out, r_out)):
            m = tensors.get(f"{name}.{side}")
            if m is None and r != d:
                raise StoreError(f"{path} has no matrix {name}.{side} although r_{side}={r} < d_{side}={d}")
            if m is not None and tuple(m.shape) != (r, d):
                raise StoreError(f"{path}: {name}.{side} has shape {tuple(m.shape)}, manifest says {(r, d)}")
            sides.append(SideProjection(d, r, None if m is None else m.float()))
        out[name] = ModuleProjection(*sides)
    return out
