"""Mixed precision: under autocast, layers see bf16 activations and bf16 output gradients; logix
upcasts them and projects in float32, so rows equal float64 rows built from those same bf16
tensors. Logging under autocast leaves the training step bit-identical."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, tokens):
        return self.fc2(F.gelu(self.fc1(self.emb(tokens))))  # [B, T, 5]


def make_data(batch=6, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 13, (batch, seq), generator=g), torch.randint(0, 5, (batch, seq), generator=g)


def token_loss(out, y):
    """Sum over tokens, mean over the batch; cross-entropy in float32 as AMP recipes do."""
    return F.cross_entropy(out.float().reshape(-1, 5), y.reshape(-1), reduction="sum") / y.shape[0]


class Recorder:
    """The tensors each layer really saw: its input and its output gradient, in their own dtype."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.seen: dict[str, list] = {n: [] for n in names}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(partial(self._forward, n)) for n in names]

    def _forward(self, name, module, inputs, output):
        entry = {"x": inputs[0].detach()}
        self.seen[name].append(entry)
        output.register_hook(lambda g: entry.__setitem__("g", g.detach()))

    def remove(self):
        for h in self.handles:
            h.remove()


def reference_rows(model, run, seen, batch: int) -> torch.Tensor:
    """Rows [B, D] in float64 from the recorded (bf16/fp16) inputs and output gradients."""
    modules = dict(model.named_modules())
    blocks = []
    for m in run.modules:
        (entry,) = seen[m.name]
        module, x, g = modules[m.name], entry["x"], entry["g"].double()
        if isinstance(module, nn.Embedding):
            x = F.one_hot(x, module.num_embeddings).double()
        else:
            x = x.double()
            if m.bias:
                x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        grad = torch.einsum("bto,bti->boi", g, x) * batch  # the batch mean undone
        p = run.projections[m.name]
        if p.p_out.matrix is not None:
            grad = p.p_out.matrix.double() @ grad
        if p.p_in.matrix is not None:
            grad = grad @ p.p_in.matrix.double().T
        blocks.append(grad.reshape(batch, -1))
    return torch.cat(blocks, dim=1)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_rows_are_float32_projections_of_low_precision_tensors(tmp_path, dtype, backward_in_autocast):
    torch.manual_seed(0)
    model = Net()
    tokens, y = make_data()
    cfg = {"projection": {"kind": "random", "rank_in": 6, "rank_out": 3, "seed": 2}}
    with logix.init(tmp_path / "r", config=cfg) as run:
        run.watch(model)
    q = logix.init(tmp_path / "r", mode="query")
    q.watch(model)
    rec = Recorder(model, [m.name for m in q.modules])
    with q(data_id=list(range(6))):
        with torch.autocast("cpu", dtype=dtype):
            loss = token_loss(model(tokens), y)
            if backward_in_autocast:
                loss.backward()
        if not backward_in_autocast:
            loss.backward()
    rec.remove()
    seen = rec.seen
    assert seen["fc2"][0]["x"].dtype == dtype and seen["fc2"][0]["g"].dtype == dtype  # really low precision
    got = q.gradients().values.double()
    want = reference_rows(model, q, seen, 6)
    err = (got - want).norm() / want.norm()
    assert err < 2e-6, f"relative error {err:.1e}: the projection was not computed in float32"


def test_training_under_autocast_is_bit_identical_with_logging(tmp_path):
    def train(model, run=None):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(3):
            tokens, y = make_data(seed=step)
            ctx = run(data_id=list(range(6 * step, 6 * step + 6))) if run else None
            if ctx:
                ctx.__enter__()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = token_loss(model(tokens), y)
            loss.backward()
            if ctx:
                ctx.__exit__(None, None, None)
            losses.append(loss.detach())
            opt.step()
            opt.zero_grad()
        return losses

    torch.manual_seed(0)
    plain = Net()
    logged = Net()
    logged.load_state_dict(plain.state_dict())
    losses_a = train(plain)
    with logix.init(tmp_path / "r", config={"projection": {"rank_in": 4, "rank_out": 4}}) as run:
        run.watch(logged)
        losses_b = train(logged, run)
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b))
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), logged.parameters()))
    assert len(logix.open_store(tmp_path / "r")) == 18


def test_grad_scaler_scale_removed_with_scale_rows(tmp_path):
    """With a loss scaler the gradients carry its scale; `step.scale_rows(1 / scale)` removes it
    (an fp16 step that overflowed is dropped with `step.discard()`)."""
    torch.manual_seed(0)
    model = Net()
    tokens, y = make_data()
    with logix.init(tmp_path / "r", config={"projection": {"kind": "identity"}}) as run:
        run.watch(model)
    rows = {}
    for scale in (1.0, 1024.0):
        q = logix.init(tmp_path / "r", mode="query")
        q.watch(model)
        with q(data_id=list(range(6))) as step:
            (token_loss(model(tokens), y) * scale).backward()
            step.scale_rows(1.0 / scale)
        rows[scale] = q.gradients().values
        model.zero_grad()
    torch.testing.assert_close(rows[1024.0], rows[1.0], rtol=1e-6, atol=1e-9)
    q = logix.init(tmp_path / "r", mode="query")
    q.watch(model)
    with q(data_id=list(range(6))) as step:
        (token_loss(model(tokens), y) * float("inf")).backward()
        step.discard()
    assert len(q.gradients().data_ids) == 0
    q = logix.init(tmp_path / "r", mode="query")
    q.watch(model)

    def overflowed_block():
        with q(data_id=list(range(6))) as step:
            (token_loss(model(tokens), y) * float("inf")).backward()
            step.skip_if_nonfinite()

    with pytest.warns(UserWarning, match="not finite"):
        overflowed_block()
    with q(data_id=list(range(6))) as step:  # a finite block after it is kept
        token_loss(model(tokens), y).backward()
        step.skip_if_nonfinite()
    assert q.gradients().data_ids == list(range(6))
