"""`logix.with_ids` / `logix.collate_with_ids`: batches carry the ids of their own examples in any
DataLoader order, and a run logged through them stores each example's own gradient under its id."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import per_example_grads, projected_rows
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import logix
from logix.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def tensors(n: int = 23):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


class DictItems(Dataset):
    """Items like a tokenized Hugging Face dataset's: dicts of variable-length token lists."""

    def __init__(self, n: int = 11):
        self.rows = [list(range(1 + (i % 4))) for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": [i * 10 + t for t in self.rows[i]], "label": i % 2}


def pad(items: list[dict]) -> dict:
    """A padding collator in the manner of DataCollatorWithPadding (it cannot take string ids)."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[row, : len(it["input_ids"])] = 1
    assert all(set(it) == {"input_ids", "label"} for it in items)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["label"] for it in items])}


def test_shuffled_tuple_batches_carry_their_own_ids():
    x, y = tensors()
    loader = DataLoader(
        logix.with_ids(TensorDataset(x, y)),
        batch_size=4,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(1),
    )
    seen = []
    for ids, xb, yb in loader:
        assert torch.equal(xb, x[ids]) and torch.equal(yb, y[ids])
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(len(x)))
    assert seen != sorted(seen)  # the order was shuffled, so the check above means something


def test_given_ids_follow_their_examples():
    x, y = tensors(9)
    names = [f"img-{i:03d}.png" for i in range(9)]
    data = logix.with_ids(TensorDataset(x, y), ids=names)
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))
    for ids, xb, _ in loader:
        assert all(isinstance(i, str) for i in ids)  # torch collates strings into a tuple
        assert torch.equal(xb, x[[names.index(i) for i in ids]])
    assert data[3][0] == "img-003.png" and len(data) == 9
    single = logix.with_ids(x)  # items that are neither tuples nor dicts: (id, item)
    assert single[4][0] == 4 and torch.equal(single[4][1], x[4])


def test_dict_items_with_a_padding_collate():
    base = DictItems()
    names = [f"doc-{i}" for i in range(len(base))]
    loader = DataLoader(
        logix.with_ids(base, ids=names),
        batch_size=3,
        shuffle=True,
        generator=torch.Generator().manual_seed(3),
        collate_fn=logix.collate_with_ids(pad),
    )
    count = 0
    for batch in loader:
        assert isinstance(batch["idx"], list) and len(batch["idx"]) == batch["input_ids"].shape[0]
        for row, name in enumerate(batch["idx"]):
            i = names.index(name)
            n = len(base.rows[i])
            assert batch["input_ids"][row, :n].tolist() == base[i]["input_ids"]
            assert batch["attention_mask"][row].sum() == n and batch["labels"][row] == base[i]["label"]
        count += len(batch["idx"])
    assert count == len(base)
    # with torch's default collate (equal-length items) the ids are kept as given, in order
    fixed = [{"x": torch.full((2,), float(i))} for i in range(5)]
    batch = logix.collate_with_ids()([logix.with_ids(fixed)[i] for i in (4, 1, 3)])
    assert batch["idx"] == [4, 1, 3] and batch["x"][:, 0].tolist() == [4.0, 1.0, 3.0]


def test_a_run_logged_through_with_ids_stores_each_examples_own_gradient(tmp_path):
    """Shuffled batches from `with_ids`: the row stored under id i is example i's gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = tensors(14)
    loader = DataLoader(
        logix.with_ids(TensorDataset(x, y)),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(4),
    )
    with logix.init(tmp_path / "r", config={"projection": {"kind": "identity"}}) as run:
        run.watch(model)
        for ids, xb, yb in loader:
            with run(data_id=ids):
                F.cross_entropy(model(xb), yb).backward()
            model.zero_grad()
    store = logix.open_store(tmp_path / "r")
    assert sorted(store.data_ids) == list(range(14)) and store.data_ids != list(range(14))
    grads = per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), (x,), y)
    expect = projected_rows(model, run.modules, run.projections, grads)  # row i: example i
    rows = store.load().double()[torch.tensor(store.data_ids).argsort()]
    assert ((rows - expect).norm() / expect.norm()) < 1e-5


def test_bad_ids_and_items_are_clear_errors():
    x, y = tensors(4)
    with pytest.raises(ConfigError, match="3 ids for a dataset of 4"):
        logix.with_ids(TensorDataset(x, y), ids=[0, 1, 2])
    with pytest.raises(ConfigError, match="ids repeat"):
        logix.with_ids(TensorDataset(x, y), ids=["a", "b", "a", "c"])
    with pytest.raises(ConfigError, match="already have a 'idx' key"):
        logix.with_ids([{"idx": 0, "x": 1}])[0]
    with pytest.raises(ConfigError, match="map-style dataset"):
        logix.with_ids(iter(range(3)))
    with pytest.raises(ConfigError, match="wrap the dataset with logix.with_ids"):
        logix.collate_with_ids()([{"x": torch.zeros(1)}])
