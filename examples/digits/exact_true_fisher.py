"""Exact full-parameter influence under the true Fisher, for the digits MLP (identity projection).

The true Fisher of module m is F_m = (1/N) Σ_{n,c} vec(G_{n,c}) vec(G_{n,c})ᵀ over the N·C
pseudo-gradients of `run.fit_curvature(fisher="true")` (C = 10 per example). For fc1 the block
is 16,640 wide, too wide for an eigendecomposition, so the scores go through the push-through
(Woodbury) identity with the (N·C)² Gram matrix K = Y Yᵀ of the pseudo-gradients Y:

    q (F + λI)⁻¹ xᵀ = (q·x − (q Yᵀ)(K + NλI)⁻¹(Y xᵀ)) / λ,      λ = damping · trace(F) / w.

A Linear layer seen at one position has outer-product gradients G = δ x̄ᵀ (δ = ∂ℓ/∂y, x̄ = the
input with the bias's 1), so ⟨G, G'⟩ = (δ·δ')(x̄·x̄') and every Gram matrix is a Hadamard product
of two small ones: exact in float64 and seconds instead of minutes. δ is the bias column of a
row (identity projection, bias captured); `check_outer_products` verifies G = δ x̄ᵀ on rows.
Blocks narrower than N·C (fc2: 2,570) use F's eigendecomposition instead.
"""

from __future__ import annotations

import torch
from torch import nn

from logix.store.format import ModuleInfo


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x̄ of the MLP's two Linear layers, with the bias's 1: {"fc1": [n, 65], "fc2": [n, 257]}."""
    with torch.no_grad():
        hidden = model.relu(model.fc1(x))
    one = torch.ones(x.shape[0], 1)
    return {"fc1": torch.cat([x, one], 1).double(), "fc2": torch.cat([hidden, one], 1).double()}


def output_grads(rows: torch.Tensor, m: ModuleInfo) -> torch.Tensor:
    """δ [n, d_out] float64: the bias column of module m's block of rows [n, D]."""
    return rows[:, m.columns].reshape(-1, m.r_out, m.r_in)[:, :, -1].double()


def check_outer_products(
    rows: torch.Tensor, inputs: dict[str, torch.Tensor], modules: list[ModuleInfo]
) -> float:
    """max |G − δ x̄ᵀ| / max |G| over modules for rows [n, D] of examples with inputs x̄."""
    worst = 0.0
    for m in modules:
        block = rows[:, m.columns].reshape(-1, m.r_out, m.r_in).double()
        outer = output_grads(rows, m).unsqueeze(2) * inputs[m.name].unsqueeze(1)
        worst = max(worst, float((block - outer).abs().max() / block.abs().max()))
    return worst


class PseudoGradients:
    """`on_rows` of a fit_curvature pass: keeps δ of every pseudo-gradient and its example."""

    def __init__(self, modules: list[ModuleInfo]):
        self.modules = modules
        self.owners: list = []
        self.deltas: dict[str, list[torch.Tensor]] = {m.name: [] for m in modules}

    def __call__(self, ids: list, rows: torch.Tensor) -> None:
        self.owners.extend(ids)
        for m in self.modules:
            self.deltas[m.name].append(output_grads(rows, m))

    def delta(self, name: str) -> torch.Tensor:
        return torch.cat(self.deltas[name])  # [N·C, d_out]


def exact_true_scores(
    modules: list[ModuleInfo],
    train_rows: torch.Tensor,
    query_rows: torch.Tensor,
    train_inputs: dict[str, torch.Tensor],
    query_inputs: dict[str, torch.Tensor],
    pseudo: PseudoGradients,
    train_ids: list,
    n_examples: int,
    dampings: list[float],
    gram: bool | None = None,
) -> dict[float, torch.Tensor]:
    """Σ_m q_m (F_m + λ_m I)⁻¹ x_mᵀ for every query and train row: {damping: [n_q, N] float64}.

    train_rows [N, D], query_rows [n_q, D]: identity-projection rows; *_inputs: `layer_inputs`
    of the same examples; pseudo: the pass's pseudo-gradients, whose owners are train ids;
    n_examples: the examples of the pass (F = Σ / n_examples). gram: solve through the Gram
    matrix (True), through F's eigendecomposition (False), or whichever is smaller (None).
    """
    position = {t: i for i, t in enumerate(train_ids)}
    owner = torch.tensor([position[t] for t in pseudo.owners])
    out = {d: torch.zeros(query_rows.shape[0], train_rows.shape[0], dtype=torch.float64) for d in dampings}
    for m in modules:
        d_train, d_query, d_pseudo = (
            output_grads(train_rows, m),
            output_grads(query_rows, m),
            pseudo.delta(m.name),
        )
        x_train, x_query = train_inputs[m.name], query_inputs[m.name]
        x_pseudo = x_train[owner]
        if gram is False or (gram is None and m.width <= d_pseudo.shape[0]):
            parts = _eigen_scores(
                d_train, d_query, d_pseudo, x_train, x_query, x_pseudo, n_examples, dampings
            )
        else:
            parts = _gram_scores(
                d_train, d_query, d_pseudo, x_train, x_query, x_pseudo, owner, n_examples, m.width, dampings
            )
        for d in dampings:
            out[d] += parts[d]
    return out


def _outer(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rows δ x̄ᵀ flattened row-major as [r_out, r_in]: [n, d_out·d_in]."""
    return (d.unsqueeze(2) * x.unsqueeze(1)).reshape(d.shape[0], -1)


def _eigen_scores(d_train, d_query, d_pseudo, x_train, x_query, x_pseudo, n_examples, dampings):
    """Narrow blocks: F = YᵀY / N explicitly, one eigendecomposition for every damping."""
    y = _outer(d_pseudo, x_pseudo)
    e, v = torch.linalg.eigh(y.T @ y / n_examples)
    e = e.clamp(min=0)
    q, x = _outer(d_query, x_query) @ v, _outer(d_train, x_train) @ v
    return {d: (q / (e + d * float(e.mean()))) @ x.T for d in dampings}


def _gram_scores(d_train, d_query, d_pseudo, x_train, x_query, x_pseudo, owner, n_examples, width, dampings):
    """Wide blocks: the push-through identity with K = (Δ Δᵀ) ⊙ (X̄ X̄ᵀ) [N·C, N·C]."""
    gram = d_pseudo @ d_pseudo.T
    gram.mul_((x_train @ x_train.T)[owner][:, owner])
    pseudo_train = (d_pseudo @ d_train.T) * (x_pseudo @ x_train.T)  # Y Xᵀ [N·C, N]
    query_pseudo = (d_query @ d_pseudo.T) * (x_query @ x_pseudo.T)  # Q Yᵀ [n_q, N·C]
    query_train = (d_query @ d_train.T) * (x_query @ x_train.T)  # Q Xᵀ [n_q, N]
    mean_eig = float(gram.diagonal().sum()) / n_examples / width  # trace(F) / w
    out = {}
    for d in dampings:
        lam = d * mean_eig
        gram.diagonal().add_(n_examples * lam)
        factor = torch.linalg.cholesky(gram)
        gram.diagonal().sub_(n_examples * lam)
        solved = torch.cholesky_solve(query_pseudo.T.contiguous(), factor)  # (K + NλI)⁻¹ Y Qᵀ
        out[d] = (query_train - solved.T @ pseudo_train) / lam
        del factor, solved
    return out
