"""JL error of a Kronecker Gaussian projection (the `random` and `kfac-whitened` kinds): the
error of one inner product ⟨P_out A P_inᵀ, P_out B P_inᵀ⟩ − ⟨A, B⟩, relative to ‖A‖‖B‖, for
[256, 65] gradients of rank 1 (one position), 8 and full, at ranks r = r_in = r_out.

    .venv/bin/python benchmarks/jl_error.py        # a few seconds
"""

from __future__ import annotations

import torch

D_OUT, D_IN, TRIALS = 256, 65, 100


def rms_error(grad_rank: int | None, r: int, gen: torch.Generator) -> float:
    errs = []
    for _ in range(TRIALS):

        def draw() -> torch.Tensor:
            if grad_rank is None:
                return torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
            return torch.randn(D_OUT, grad_rank, generator=gen, dtype=torch.float64) @ torch.randn(
                grad_rank, D_IN, generator=gen, dtype=torch.float64
            )

        a = draw()
        b = 0.5 * a + draw()  # correlated, cosine about 0.45
        p_out = torch.randn(r, D_OUT, generator=gen, dtype=torch.float64) / r**0.5
        p_in = torch.randn(r, D_IN, generator=gen, dtype=torch.float64) / r**0.5
        pa, pb = p_out @ a @ p_in.T, p_out @ b @ p_in.T
        errs.append(float(((pa * pb).sum() - (a * b).sum()) / (a.norm() * b.norm())))
    return float(torch.tensor(errs).pow(2).mean().sqrt())


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print("gradient rank | " + " | ".join(f"r={r}" for r in (8, 16, 32, 64)))
    for grad_rank in (1, 8, None):
        cells = [f"{rms_error(grad_rank, r, gen):.3f}" for r in (8, 16, 32, 64)]
        print(f"{grad_rank or 'full':>13} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
