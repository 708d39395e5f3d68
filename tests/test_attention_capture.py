"""nn.MultiheadAttention and the PyTorch transformer layers, captured exactly: every variant's
rows equal torch.func per-example gradients; training is bit-identical with logix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_helpers import assert_rows_match, captured_and_reference
from torch import nn

import logix

E, T, B = 8, 5, 3


def _sequence_loss(out, y):
    """Cross-entropy over every position of the batch, summed: [B, T, C], [B, T] (-100 = pad)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")


class AttentionNet(nn.Module):
    """One MultiheadAttention between an input map and a head; inputs are batch first, the
    layer sees them its own way (`batch_first`)."""

    def __init__(
        self,
        batch_first=True,
        bias=True,
        add_bias_kv=False,
        kdim=None,
        vdim=None,
        cross=False,
        need_weights=False,
        attn_mask=None,
        causal=False,
    ):
        super().__init__()
        self.batch_first, self.cross, self.need_weights, self.causal = (
            batch_first,
            cross,
            need_weights,
            causal,
        )
        self.inp = nn.Linear(E, E)
        self.memory = cross or kdim is not None
        if self.memory:  # keys and values of their own
            self.mem_k = nn.Linear(E, kdim or E)
            self.mem_v = nn.Linear(E, vdim or E)
        self.attn = nn.MultiheadAttention(
            E, 2, bias=bias, add_bias_kv=add_bias_kv, kdim=kdim, vdim=vdim, batch_first=batch_first
        )
        self.head = nn.Linear(E, 4)
        self.attn_mask = attn_mask

    def forward(self, x, pad):
        q = torch.tanh(self.inp(x))
        k = self.mem_k(torch.sin(x)) if self.memory else q
        v = self.mem_v(torch.sin(x)) if self.memory else q
        if not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        h, _ = self.attn(
            q,
            k,
            v,
            key_padding_mask=pad,
            need_weights=self.need_weights,
            attn_mask=self.attn_mask,
            is_causal=self.causal,
        )
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


def _batch(gen):
    x = torch.randn(B, T, E, generator=gen)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, -2:] = True  # right padding of the first example
    y = torch.randint(0, 4, (B, T), generator=gen)
    y[pad] = -100
    return x, pad, y


CAUSAL = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
VARIANTS = {
    "packed-batch-first": {},
    "packed-seq-first": {"batch_first": False},
    "no-bias": {"bias": False},
    "need-weights": {"need_weights": True},
    "attn-mask": {"attn_mask": torch.randn(T, T, generator=torch.Generator().manual_seed(3))},
    "is-causal": {"attn_mask": CAUSAL, "causal": True},
    "cross-attention": {"cross": True},
    "cross-seq-first": {"cross": True, "batch_first": False, "need_weights": True},
    "separate-kdim-vdim": {"kdim": 6, "vdim": 7},
    "separate-seq-first": {"kdim": 6, "vdim": 7, "batch_first": False},
    "add-bias-kv": {"add_bias_kv": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_multihead_attention_rows_match_torch_func(tmp_path, variant):
    torch.manual_seed(0)
    model = AttentionNet(**VARIANTS[variant])
    x, pad, y = _batch(torch.Generator().manual_seed(1))
    if variant == "add-bias-kv":
        with pytest.warns(UserWarning, match="bias_k and bias_v"):
            got, want, modules = captured_and_reference(
                tmp_path, model, (x, pad), y, _sequence_loss, mask=~pad
            )
    else:
        got, want, modules = captured_and_reference(tmp_path, model, (x, pad), y, _sequence_loss, mask=~pad)
    names = {m.name: m.type for m in modules}
    if VARIANTS[variant].get("kdim"):
        assert {"attn.q_proj", "attn.k_proj", "attn.v_proj"} <= names.keys()
        assert names["attn.k_proj"] == "MultiheadAttention.k_proj"
    else:
        assert names["attn.in_proj"] == "MultiheadAttention.in_proj"
    assert names["attn.out_proj"] == "Linear"
    assert_rows_match(got, want, modules)


def _training_step(model, x, pad, y, run=None, step=0):
    model.zero_grad()
    if run is None:
        out = model(x, pad)
        _sequence_loss(out, y).backward()
    else:
        with run(data_id=[step * B + i for i in range(B)], mask=~pad):
            out = model(x, pad)
            _sequence_loss(out, y).backward()
    return out.detach().clone(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["packed-batch-first", "separate-seq-first", "cross-attention"])
def test_training_is_bit_identical_with_logix(tmp_path, variant):
    torch.manual_seed(0)
    model = AttentionNet(**VARIANTS[variant])
    x, pad, y = _batch(torch.Generator().manual_seed(1))
    plain_out, plain_grads = _training_step(model, x, pad, y)
    with logix.init(
        tmp_path / "run", config={"projection": {"kind": "random", "rank_in": 4, "rank_out": 4}}
    ) as run:
        run.watch(model)
        for step in range(3):  # the audited first block, then the ordinary ones
            out, grads = _training_step(model, x, pad, y, run, step)
            assert torch.equal(out, plain_out)
            for k in plain_grads:
                assert torch.equal(grads[k], plain_grads[k]), k


class EncoderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(E, E)
        self.enc = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 4)

    def forward(self, x, pad):
        return self.head(self.enc(self.inp(x), src_key_padding_mask=pad))


def test_transformer_encoder_layer_gram_equals_torch_func(tmp_path):
    """The issue's case: out_proj's columns were 0.0 and in_proj_weight was not captured."""
    torch.manual_seed(0)
    model = EncoderNet()
    x, pad, y = _batch(torch.Generator().manual_seed(1))
    got, want, modules = captured_and_reference(tmp_path, model, (x, pad), y, _sequence_loss, mask=~pad)
    names = [m.name for m in modules]
    assert "enc.self_attn.in_proj" in names and "enc.self_attn.out_proj" in names
    assert_rows_match(got, want, modules)
    torch.testing.assert_close(got @ got.T, want @ want.T, rtol=1e-5, atol=1e-6)
    # Every matrix parameter of the layer has its columns: nothing silently left out.
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2)
    assert sum((m.d_in - m.bias) * m.d_out for m in modules) == matrices


class Seq2Seq(nn.Module):
    """nn.Transformer (encoder and decoder stacks: self-, causal and cross-attention)."""

    def __init__(self):
        super().__init__()
        self.src = nn.Linear(E, E)
        self.tgt = nn.Linear(E, E)
        self.transformer = nn.Transformer(E, 2, 1, 1, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 4)

    def forward(self, x, pad):
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        h = self.transformer(
            self.src(x),
            self.tgt(x.roll(1, 1)),
            tgt_mask=mask,
            tgt_is_causal=True,
            src_key_padding_mask=pad,
            memory_key_padding_mask=pad,
        )
        return self.head(h)


class DecoderNet(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.dec = nn.TransformerDecoderLayer(E, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(E, 4)

    def forward(self, x, pad):
        t, m = (x, torch.sin(x)) if self.batch_first else (x.transpose(0, 1), torch.sin(x).transpose(0, 1))
        h = self.dec(t, m, tgt_key_padding_mask=pad, memory_key_padding_mask=pad)
        return self.head(h if self.batch_first else h.transpose(0, 1))


class SequenceFirstEncoder(nn.Module):
    """nn.TransformerEncoder of batch_first=False layers: its Linears see [T, B, d]."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, 4)

    def forward(self, x, pad):
        return self.head(self.enc(x.transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1))


NETS = {
    "transformer": Seq2Seq,
    "decoder-layer": DecoderNet,
    "decoder-layer-seq-first": lambda: DecoderNet(batch_first=False),
    "encoder-seq-first": SequenceFirstEncoder,
}


@pytest.mark.parametrize("net", list(NETS))
def test_transformer_and_decoder_layer_rows_match(tmp_path, net):
    torch.manual_seed(0)
    model = NETS[net]()
    x, pad, y = _batch(torch.Generator().manual_seed(1))
    mask = ~pad
    got, want, modules = captured_and_reference(tmp_path, model, (x, pad), y, _sequence_loss, mask=mask)
    assert sum(m.type == "MultiheadAttention.in_proj" for m in modules) == (3 if net == "transformer" else 2)
    assert_rows_match(got, want, modules)


def test_kfac_input_factor_of_in_proj_is_the_dense_sum(tmp_path):
    """K-FAC sums during logging reach the attention projections too: A of `attn.in_proj` is
    Σ [x, 1][x, 1]ᵀ over the unmasked positions of the attention layer's input."""
    from logix.curvature.kfac import load_factors

    torch.manual_seed(0)
    model = AttentionNet()
    x, pad, y = _batch(torch.Generator().manual_seed(1))
    cfg = {
        "projection": {"kind": "identity"},
        "capture": {"loss_reduction": "sum"},
        "curvature": {"statistics": ["kfac"]},
    }
    with logix.init(tmp_path / "run", config=cfg) as run:
        run.watch(model)
        with run(data_id=list(range(B)), mask=~pad):
            _sequence_loss(model(x, pad), y).backward()
    stats = load_factors(logix.open_store(tmp_path / "run"))
    q = torch.tanh(model.inp(x)).detach().double()[~pad]  # [positions, E]
    q = torch.cat([q, torch.ones(q.shape[0], 1, dtype=q.dtype)], dim=1)
    assert stats.positions["attn.in_proj"] == q.shape[0]
    torch.testing.assert_close(stats.tensors["attn.in_proj.A"], q.T @ q, rtol=1e-5, atol=1e-6)
    assert stats.tensors["attn.in_proj.S"].abs().max() > 0
