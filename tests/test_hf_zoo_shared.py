"""Hugging Face architectures with shared and routed parameters, built from tiny random configs
(no downloads): Llama with tied and untied embeddings, BART (encoder-decoder, cross-attention,
embeddings tied three ways) and Mixtral (mixture of experts). For each, the share of matrix
parameters captured (all but what is refused out loud), and every captured module's rows equal
to torch.func per-example gradients of a padded batch."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import projected_rows

import logix

transformers = pytest.importorskip("transformers")

V, B, T = 40, 3, 6


def _llama(tied: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg)


def _bart():
    cfg = transformers.BartConfig(
        vocab_size=V,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        max_position_embeddings=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    return transformers.BartForConditionalGeneration(cfg)


def _mixtral():
    cfg = transformers.MixtralConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=16,
    )
    return transformers.MixtralForCausalLM(cfg)


def _batch():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0  # right padding
    tokens[mask == 0] = 1
    labels = tokens.roll(-1, 1).masked_fill(mask == 0, -100)
    return tokens, mask, labels


def _loss(model, tokens, mask, labels):
    kwargs = {"input_ids": tokens, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        kwargs.update(decoder_input_ids=tokens, decoder_attention_mask=mask)
    logits = model(**kwargs).logits
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")


def _reference_grads(model, tokens, mask, labels) -> dict:
    """Per-example gradients by torch.func.grad, one example at a time (tied parameters appear
    once: the gradient of all their uses)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, i):
        kwargs = {"input_ids": tokens[i : i + 1], "attention_mask": mask[i : i + 1]}
        if model.config.is_encoder_decoder:
            kwargs.update(decoder_input_ids=tokens[i : i + 1], decoder_attention_mask=mask[i : i + 1])
        logits = torch.func.functional_call(model, p, (), kwargs).logits
        return F.cross_entropy(logits.reshape(-1, V), labels[i], ignore_index=-100, reduction="sum")

    per = [torch.func.grad(loss)(params, i) for i in range(B)]
    return {k: torch.stack([g[k] for g in per]) for k in params}


def _matrix_share(model, modules, refused=()) -> float:
    """The share of the model's matrix parameters in captured entries, of those not refused
    out loud (`refused`: module names a notice named)."""
    named = dict(model.named_modules())
    captured = {id(named[m.name].weight) for m in modules if m.name in named}
    left_out = {id(named[n].weight) for n in refused}
    matrices = {id(p): p.numel() for p in model.parameters() if p.ndim >= 2 and id(p) not in left_out}
    return sum(n for i, n in matrices.items() if i in captured) / sum(matrices.values())


CASES = {
    "llama-tied": lambda: _llama(True),
    "llama-untied": lambda: _llama(False),
    "bart": _bart,
    "mixtral": _mixtral,
}


@pytest.mark.parametrize("case", list(CASES))
def test_rows_match_torch_func_and_matrices_are_covered(tmp_path, case):
    torch.manual_seed(0)
    model = CASES[case]()
    model.config._attn_implementation = "eager"
    model.train()
    tokens, mask, labels = _batch()
    cfg = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "sum"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with logix.init(tmp_path / "run", config=cfg) as run:
            run.watch(model)
    notices = " ".join(str(w.message) for w in caught)
    query = logix.init(tmp_path / "run", mode="query")
    query.watch(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with query(data_id=list(range(B)), mask=mask):
            _loss(model, tokens, mask, labels).backward()
    # Position embeddings looked up once for the whole batch are shared, skipped with a notice.
    shared = {
        m.name
        for m in query.modules
        if f"{m.name!r} is an Embedding called without a batch" in " ".join(str(w.message) for w in caught)
    }
    got = query.gradients().values.double()
    modules = query.modules
    query.finalize()
    want = projected_rows(model, modules, query.projections, _reference_grads(model, tokens, mask, labels))
    assert shared == set()  # BART's decoder positions [1, T] are expanded to each example
    for m in modules:
        if m.name in shared:
            assert got[:, m.columns].abs().max() == 0
            continue
        torch.testing.assert_close(
            got[:, m.columns], want[:, m.columns], rtol=1e-4, atol=1e-6, msg=lambda s, m=m: f"{m.name}: {s}"
        )
    share = _matrix_share(model, [m for m in modules if m.name not in shared], shared)
    if case == "mixtral":  # fused 3-D experts (and the router) are refused out loud
        assert "experts.gate_up_proj" in notices and "experts.down_proj" in notices
        assert share < 0.99
    else:
        assert share >= 0.99, share
    if case in ("llama-tied", "bart"):  # one block for the tied table, none for lm_head
        assert "lm_head" not in {m.name for m in modules}
