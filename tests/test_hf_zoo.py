"""Hugging Face models from tiny random configs (no downloads): GPT-2 (Conv1D layers, untied
head), BERT (sequence classification) and ViT (image classification). For each: the coverage
table at watch, at least 99% of the matrix parameters captured with the default config, and
every captured module's rows equal to torch.func per-example gradients, padding masks
included. (Tied embeddings, T5/BART and MoE: tests/test_hf_zoo_shared.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import projected_rows
from torch import nn
from torch.func import functional_call, grad

import logix

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ, BATCH = 40, 7, 3
CONFIG = {"projection": {"kind": "identity"}, "capture": {"loss_reduction": "sum"}}


class Wrapped(nn.Module):
    """model(inputs, mask) -> logits, so that store names and torch.func names agree."""

    def __init__(self, hf: nn.Module, kind: str):
        super().__init__()
        self.hf, self.kind = hf, kind

    def forward(self, inputs, mask=None):
        if self.kind == "vit":
            return self.hf(pixel_values=inputs).logits
        return self.hf(input_ids=inputs, attention_mask=mask).logits


def per_example_loss(kind: str, logits: torch.Tensor, inputs: torch.Tensor, labels, mask) -> torch.Tensor:
    """[B] losses: next-token cross-entropy summed over real tokens (GPT-2), else classification."""
    if kind != "gpt2":
        return F.cross_entropy(logits, labels, reduction="none")
    targets = inputs[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return per_token.sum(1)


def build(kind: str) -> tuple[Wrapped, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    torch.manual_seed(0)
    common = dict(num_attention_heads=2, attn_implementation="eager")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0, attn_implementation="eager",
        )  # fmt: skip
        hf = transformers.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, intermediate_size=32,
            max_position_embeddings=SEQ, num_labels=3, **common,
        )  # fmt: skip
        hf = transformers.BertForSequenceClassification(cfg)
    else:
        cfg = transformers.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
            intermediate_size=128, num_labels=3, **common,
        )  # fmt: skip
        hf = transformers.ViTForImageClassification(cfg)
    hf.eval()  # dropout off: the step is deterministic, so torch.func sees the same function
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (BATCH,), generator=gen)
    if kind == "vit":
        return Wrapped(hf, kind), torch.randn(BATCH, 3, 8, 8, generator=gen), None, labels
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, 4:] = 0  # padded examples of different lengths
    mask[2, 6:] = 0
    return Wrapped(hf, kind), ids.masked_fill(mask == 0, 0), mask, labels


def reference_grads(model: Wrapped, inputs, mask, labels) -> dict[str, torch.Tensor]:
    """{parameter: [B, ...]}: torch.func gradient of each example's own loss, the example run
    alone with its own padding mask."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out: dict[str, list] = {k: [] for k in params}
    for i in range(inputs.shape[0]):
        x, m, y = inputs[i : i + 1], None if mask is None else mask[i : i + 1], labels[i : i + 1]

        def loss(p, x=x, m=m, y=y):
            return per_example_loss(model.kind, functional_call(model, p, (x, m)), x, y, m).sum()

        for k, v in grad(loss)(params).items():
            out[k].append(v)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("kind", ["gpt2", "bert", "vit"])
def test_zoo_coverage_and_rows(tmp_path, capsys, kind):
    model, inputs, mask, labels = build(kind)
    with logix.init(tmp_path / "r", config=CONFIG) as run:
        run.watch(model)
    coverage = run.coverage()
    assert "logix watches" in capsys.readouterr().err  # the table was printed
    assert coverage.matrix_share >= 0.99, coverage.uncovered
    uncovered = {g.type: g for g in coverage.uncovered_matrices()}
    if kind == "vit":  # its bare tensors: cls_token [1, 1, D] and position_embeddings [1, N + 1, D]
        embeddings = model.hf.vit.embeddings
        assert uncovered["ViTEmbeddings"].matrix_parameters == (
            embeddings.cls_token.numel() + embeddings.position_embeddings.numel()
        )
        assert set(uncovered) == {"ViTEmbeddings"}
    else:
        assert coverage.matrix_share == 1.0 and not uncovered
    query = logix.init(tmp_path / "r", mode="query")
    query.watch(model)
    with query(data_id=list(range(BATCH)), mask=mask):
        logits = model(inputs, mask)
        per_example_loss(kind, logits, inputs, labels, mask).sum().backward()
    got = query.gradients().values.double()
    reference = reference_grads(model, inputs, mask, labels)
    want = projected_rows(model, query.modules, query.projections, reference)
    for m in query.modules:  # module by module, so that a failure names the module
        block, ref = got[:, m.columns], want[:, m.columns]
        torch.testing.assert_close(block, ref, rtol=1e-4, atol=1e-6, msg=f"{kind}: module {m.name}")
        assert ref.abs().sum() > 0, f"{kind}: module {m.name} has no gradient in the reference"


def test_gpt2_gradients_bit_identical_with_logix(tmp_path):
    """Position embeddings looked up once for the batch are captured per example through an
    expanded view of their output: the model's gradients are unchanged, bit for bit."""
    model, ids, mask, labels = build("gpt2")
    per_example_loss("gpt2", model(ids, mask), ids, labels, mask).sum().backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    with logix.init(tmp_path / "r", config=CONFIG) as run:
        run.watch(model)
        with run(data_id=list(range(BATCH)), mask=mask):
            per_example_loss("gpt2", model(ids, mask), ids, labels, mask).sum().backward()
    assert "hf.transformer.wpe" in [m.name for m in run.modules]
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, plain[k]), k
