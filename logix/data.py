"""Data ids without friction: a map-style dataset whose items carry their ids, and the collate
function for dict batches, so that `for ids, x, y in loader: with run(data_id=ids): ...` works
with any `torch.utils.data.Dataset` and any DataLoader order (shuffled, sampled).

    loader = DataLoader(logix.with_ids(train_set), batch_size=64, shuffle=True)
    for ids, x, y in loader:              # items (idx, x, y): ids [B] follow each example
        with run(data_id=ids): ...

    loader = DataLoader(logix.with_ids(tokenized), batch_size=16,
                        collate_fn=logix.collate_with_ids(DataCollatorWithPadding(tok)))
    for batch in loader:                  # dict items: {"idx": id, **item}
        with run(data_id=batch["idx"], mask=batch["attention_mask"]): ...

An example's id is its index in the wrapped dataset (stable whatever the loader's order), or
`ids[index]` when you give one id per example (ints or strings: file names, hashes, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset, default_collate

from logix.errors import ConfigError

ID_KEY = "idx"  # the key of a dict item's id (the Hugging Face integration's default id column)


class WithIds(Dataset):
    """`dataset` whose item `i` carries its id: `(id, *item)` for a tuple or list item, the dict
    item with `key` added for a mapping item, `(id, item)` for anything else (a tensor)."""

    def __init__(self, dataset: Any, ids: Sequence[Any] | None = None, key: str = ID_KEY):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigError(
                f"with_ids needs a map-style dataset (with __getitem__ and __len__), got "
                f"{type(dataset).__name__}; for an iterable dataset, yield the ids with the items"
            )
        n = len(dataset)
        if ids is not None:
            ids = list(ids)
            if len(ids) != n:
                raise ConfigError(
                    f"with_ids: {len(ids)} ids for a dataset of {n} examples: give one id per example"
                )
            seen: set = set()
            repeated = []
            for i in ids:
                if i in seen:
                    repeated.append(i)
                seen.add(i)
            if repeated:
                raise ConfigError(f"with_ids: ids repeat ({repeated[:10]}): each example needs its own id")
        self.dataset, self.ids, self.key = dataset, ids, key

    def __len__(self) -> int:
        return len(self.dataset)

    def id_of(self, index: int) -> Any:
        """The id of the example at `index`."""
        return index if self.ids is None else self.ids[index]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        data_id = self.id_of(index)
        if isinstance(item, Mapping):
            if self.key in item:
                raise ConfigError(
                    f"with_ids: the dataset's items already have a {self.key!r} key; pass "
                    f"key='...' to name the id another way, or use that column as the ids"
                )
            return {self.key: data_id, **item}
        if isinstance(item, (tuple, list)):
            return (data_id, *item)
        return (data_id, item)


def with_ids(dataset: Any, ids: Sequence[Any] | None = None, key: str = ID_KEY) -> WithIds:
    """Wrap a map-style `dataset` so that every item carries its id (see `WithIds`): the
    example's index, or `ids[index]`. A DataLoader over it then yields `(ids, *batch)` for tuple
    items and dicts with `batch[key]` for dict items (`collate_with_ids` for padding collators)."""
    return WithIds(dataset, ids, key)


def collate_with_ids(
    collate_fn: Callable[[list], Any] | None = None, key: str = ID_KEY
) -> Callable[[list[Mapping]], Any]:
    """A collate function for dict items with ids: takes `key` out of each item, collates the rest
    with `collate_fn` (default: torch's `default_collate`; e.g. a Hugging Face
    `DataCollatorWithPadding`, which would choke on string ids) and puts the ids back as a list
    under `key`, one per example in batch order."""
    inner = default_collate if collate_fn is None else collate_fn

    def collate(items: list[Mapping]) -> Any:
        if not all(isinstance(item, Mapping) and key in item for item in items):
            raise ConfigError(
                f"collate_with_ids: every item must be a dict with a {key!r} key "
                "(wrap the dataset with logix.with_ids); tuple items need no special collate"
            )
        ids = [item[key] for item in items]
        batch = inner([{k: v for k, v in item.items() if k != key} for item in items])
        batch[key] = ids
        return batch

    return collate
