"""Hugging Face Trainer integration on a tiny random GPT-2 (no downloads): logged rows are exact
per-example gradients of each example's own token loss, training is unchanged, and the
attribution pass over the trained model agrees with torch.func."""

from __future__ import annotations

import pytest
import torch
from child_process import run_python
from torch.func import functional_call, grad

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import logix
from logix.errors import CaptureError
from logix.integrations.huggingface import attach, log_dataset

VOCAB, SEQ, N = 23, 10, 12
WATCHED = ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj"]
CONFIG = {"capture": {"include": WATCHED}, "projection": {"kind": "identity"}, "store": {"shard_rows": 5}}


class TokenDataset(torch.utils.data.Dataset):
    """Integer sequences of varied length, right-padded: input_ids, attention_mask, labels
    (-100 at padding) and the example's id."""

    def __init__(self, n=N, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            length = int(torch.randint(4, SEQ + 1, (1,), generator=g))
            ids = torch.zeros(SEQ, dtype=torch.long)
            ids[:length] = torch.randint(1, VOCAB, (length,), generator=g)
            mask = (torch.arange(SEQ) < length).long()
            self.items.append(
                {
                    "input_ids": ids,
                    "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100),
                    "idx": 100 + i,
                }
            )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return dict(self.items[i])


def tiny_gpt2(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


class Snapshots(transformers.TrainerCallback):
    """The watched weights at the start of every optimizer step."""

    def __init__(self):
        self.states = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.states.append({k: v.detach().clone() for k, v in model.named_parameters()})


def trainer_for(model, tmp_path, max_steps=4, **extra):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        **extra,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=TokenDataset(), eval_dataset=TokenDataset(4, seed=1)
    )


def reference_row(model, params, item, per_example_loss):
    """torch.func gradient of one unpadded example's own loss for the watched Conv1D layers,
    arranged as a store row: [weightᵀ | bias] per module, flattened."""
    length = int(item["attention_mask"].sum())
    ids = item["input_ids"][None, :length]

    def loss(p):
        logits = functional_call(model, p, (ids,)).logits[0, :-1]
        total = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        return total if per_example_loss == "sum" else total / (length - 1)

    names = [f"{m}.{k}" for m in WATCHED for k in ("weight", "bias")]
    g = grad(loss)({k: v for k, v in params.items()})
    blocks = [torch.cat([g[f"{m}.weight"].T, g[f"{m}.bias"][:, None]], 1).reshape(-1) for m in WATCHED]
    assert all(n in g for n in names)
    return torch.cat(blocks)


@pytest.mark.parametrize("per_example_loss, epochs", [("sum", 2), ("mean", 1)])
def test_trainer_rows_are_exact_per_example_gradients(tmp_path, per_example_loss, epochs):
    model = tiny_gpt2()
    trainer = trainer_for(model, tmp_path, max_steps=2 * epochs)
    snaps = Snapshots()
    trainer.add_callback(snaps)
    with logix.init(tmp_path / "run", config=CONFIG) as run:
        attach(trainer, run, per_example_loss=per_example_loss)
        trainer.train()
        trainer.evaluate()  # the id column is kept away from evaluation too
    assert len(snaps.states) == 2 * epochs
    data = TokenDataset()
    for epoch in range(epochs):  # 12 examples, 2 optimizer steps of 2 micro-batches of 3 per epoch
        store = logix.open_store(tmp_path / "run", segment=f"epoch-{epoch}")
        assert sorted(store.data_ids) == list(range(100, 112))
        assert store.segment_meta["epoch"] == epoch and "lr" in store.segment_meta
        # 2 optimizer steps of 2 accumulated micro-batches: steps counts optimizer steps
        assert store.segment_meta["steps"] == 2 and store.segment_meta["logged_batches"] == 4
        rows = store.load().double()
        for j, data_id in enumerate(store.data_ids):
            params = snaps.states[2 * epoch + j // 6]  # 6 examples per optimizer step
            want = reference_row(model, params, data[data_id - 100], per_example_loss).double()
            err = (rows[j] - want).norm() / want.norm()
            assert err < 1e-5, f"example {data_id}: relative error {err:.1e}"
        if epoch == 1:  # rows really follow the weights of their own step
            stale = reference_row(model, snaps.states[0], data[store.data_ids[0] - 100], per_example_loss)
            assert (rows[0] - stale.double()).norm() > 1e-3 * stale.norm()


def train_and_read(tmp_path, name, logged, **extra):
    model = tiny_gpt2(dropout=0.1)
    trainer = trainer_for(model, tmp_path / name, max_steps=2, **extra)
    if logged:
        run = logix.init(tmp_path / name / "run", config=CONFIG)
        attach(trainer, run)
    trainer.train()
    if logged:
        run.finalize()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, losses


def test_training_unchanged_by_logging(tmp_path):
    """Same seed, dropout on, bf16 autocast (CPU): final parameters and losses bit-identical."""
    plain, losses_a = train_and_read(tmp_path, "plain", logged=False, bf16=True)
    logged, losses_b = train_and_read(tmp_path, "logged", logged=True, bf16=True)
    assert losses_a == losses_b and len(losses_a) == 2
    for (name, a), b in zip(plain.named_parameters(), logged.parameters()):
        assert torch.equal(a, b), name


def test_gradient_checkpointing_and_bf16_trainer(tmp_path):
    """HF gradient checkpointing gives the rows of the run without it; under bf16 autocast the
    rows are finite and near the float32 ones (bf16 forward, so not equal)."""
    rows = {}
    for name, extra in (("plain", {}), ("ckpt", {"gradient_checkpointing": True}), ("bf16", {"bf16": True})):
        model = tiny_gpt2()
        trainer = trainer_for(model, tmp_path / name, max_steps=2, **extra)
        with logix.init(tmp_path / name / "run", config=CONFIG) as run:
            attach(trainer, run)
            trainer.train()
        rows[name] = logix.open_store(tmp_path / name / "run").load().double()
    torch.testing.assert_close(rows["ckpt"], rows["plain"], rtol=1e-5, atol=1e-6)
    err = (rows["bf16"] - rows["plain"]).norm() / rows["plain"].norm()
    assert torch.isfinite(rows["bf16"]).all() and 1e-4 < err < 0.05, f"bf16 relative error {err:.2e}"


def test_fp16_loss_scale_divided_out_and_overflowed_step_skipped(tmp_path):
    """fp16 as on a GPU (autocast fp16 + GradScaler), simulated on the CPU: the first step's
    scale 2^40 overflows (the optimizer skips it; logix skips its rows, warning), the next
    step's rows carry the scale 2^12, which logix divides out."""
    model = tiny_gpt2()
    trainer = trainer_for(model, tmp_path, max_steps=2, fp16=True)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-28)
    trainer.accelerator.native_amp = True  # what accelerate sets for fp16 on a GPU
    snaps = Snapshots()
    trainer.add_callback(snaps)
    dtypes = []
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with logix.init(tmp_path / "run", config=CONFIG) as run:
        attach(trainer, run)
        with pytest.warns(UserWarning, match="not finite"):
            trainer.train()
    assert dtypes[0] == torch.float16 and trainer.accelerator.scaler.get_scale() == 2.0**12
    store = logix.open_store(tmp_path / "run")
    assert len(store) == 6  # the second optimizer step's two micro-batches
    rows, data = store.load().double(), TokenDataset()
    for j, data_id in enumerate(store.data_ids):
        want = reference_row(model, snaps.states[1], data[data_id - 100], "sum").double()
        assert (rows[j] - want).norm() / want.norm() < 3e-3  # fp16 forward


@pytest.mark.parametrize("per_example_loss", ["sum", "mean"])
def test_log_dataset_attribution_pass(tmp_path, per_example_loss):
    model = tiny_gpt2(dropout=0.1)  # log_dataset switches dropout off (eval mode) for the pass
    data = TokenDataset()
    cfg = {**CONFIG, "capture": {**CONFIG["capture"], "attribution_only": True}}
    pending = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    for k, p in model.named_parameters():  # a caller's pending gradients stay as they were
        p.grad = pending[k].clone()
    with logix.init(tmp_path / "run", config=cfg) as run:
        assert log_dataset(model, data, run, batch_size=5, per_example_loss=per_example_loss) == N
    assert model.training
    assert all(torch.equal(p.grad, pending[k]) for k, p in model.named_parameters())
    for p in model.parameters():
        p.grad = None
    store = logix.open_store(tmp_path / "run")
    assert store.data_ids == list(range(100, 112))
    rows = store.load().double()
    model.eval()
    params = dict(model.named_parameters())
    for j in range(0, N, 2):  # half the examples, in each of the three batches
        want = reference_row(model, params, data[j], per_example_loss).double()
        assert (rows[j] - want).norm() / want.norm() < 1e-5
    # query mode: the same pass keeps the gradients in memory
    q = logix.init(tmp_path / "run", mode="query")
    log_dataset(model, TokenDataset(3, seed=1), q, per_example_loss=per_example_loss)
    assert q.gradients().data_ids == [100, 101, 102]


def test_missing_id_column_and_label_smoothing_are_clear_errors(tmp_path):
    class NoIds(TokenDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            del item["idx"]
            return item

    trainer = trainer_for(tiny_gpt2(), tmp_path / "a", max_steps=1)
    trainer.train_dataset = NoIds()
    run = logix.init(tmp_path / "a" / "run", config=CONFIG)
    attach(trainer, run)
    with pytest.raises(CaptureError, match="no 'idx' column"):
        trainer.train()
    run.finalize()
    trainer = trainer_for(tiny_gpt2(), tmp_path / "b", max_steps=1, label_smoothing_factor=0.1)
    with pytest.raises(CaptureError, match="label_smoothing_factor=0"):
        attach(trainer, logix.init(tmp_path / "b" / "run", config=CONFIG))


def test_settings_that_would_break_training_are_refused(tmp_path):
    """attribution_only would freeze the parameters during training; per-example 'mean' scaling
    cannot be folded into K-FAC factors: both refused before anything runs."""
    trainer = trainer_for(tiny_gpt2(), tmp_path / "a", max_steps=1)
    frozen = {**CONFIG, "capture": {**CONFIG["capture"], "attribution_only": True}}
    with pytest.raises(CaptureError, match="attribution_only"):
        attach(trainer, logix.init(tmp_path / "a" / "run", config=frozen))
    factors = {**CONFIG, "curvature": {"statistics": ["kfac"]}}
    with pytest.raises(CaptureError, match="per_example_loss='sum'"):
        attach(trainer, logix.init(tmp_path / "b" / "run", config=factors), per_example_loss="mean")


def test_detach_restores_the_trainer(tmp_path):
    trainer = trainer_for(tiny_gpt2(), tmp_path, max_steps=1)
    run = logix.init(tmp_path / "run", config=CONFIG)
    handle = attach(trainer, run)
    with pytest.raises(CaptureError, match="already logs"):
        attach(trainer, run)
    handle.detach()
    assert not {"training_step", "compute_loss", "prediction_step", "_logix"} & set(vars(trainer))
    assert "idx" not in trainer._signature_columns
    assert not any(type(c).__name__ == "LogixCallback" for c in trainer.callback_handler.callbacks)
    run.finalize()


def test_custom_loss_is_detected(tmp_path):
    class DoubledLoss(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, True, num_items_in_batch)
            loss = loss + 0.1 * out.logits.pow(2).mean()
            return (loss, out) if return_outputs else loss

    model = tiny_gpt2()
    args = trainer_for(model, tmp_path, max_steps=1).args
    trainer = DoubledLoss(model=model, args=args, train_dataset=TokenDataset())
    run = logix.init(tmp_path / "run", config=CONFIG)
    attach(trainer, run)
    with pytest.raises(CaptureError, match="not the token cross-entropy"):
        trainer.train()
    run.finalize()


def test_import_logix_does_not_import_transformers():
    code = "import sys, logix; logix.init; assert 'transformers' not in sys.modules"
    run_python("-c", code, check=True, capture_output=False)
