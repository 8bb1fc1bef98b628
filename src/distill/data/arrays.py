"""In-memory datasets, the train/val/test bundle, and the seeded stratified split helpers.

Every loader in ``distill.data`` ends by calling :func:`split_labelled` / :func:`hide_labels`
so all datasets share one definition of "stratified, seeded, unlabelled rows only in train".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor

from distill.errors import UserError

UNLABELLED = -1


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory dataset: x float32 tensor (N, *input_shape), y int64 tensor (N,), label -1 = unlabelled.

    ``__getitems__`` gathers a whole batch with one index op (``StackedRows``): distill's loaders take it as is,
    and a plain ``DataLoader(ds, batch_size=128)`` with PyTorch's default collate works too.
    """

    def __init__(self, x: Tensor, y: Tensor):
        if len(x) != len(y):
            raise ValueError(f"ArrayDataset: x has {len(x)} rows but y has {len(y)}")
        self.x = x
        self.y = y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> "StackedRows":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return StackedRows(self.x[idx], self.y[idx])


class StackedRows(Sequence):
    """A batch gathered with one index op per tensor, that still reads as the list of its rows.

    `.batch` is the stacked (x, y): what distill's loaders use (one index op per batch instead of one per row matters
    for small models). Read as a sequence it yields (x[i], y[i]), so PyTorch's default collate, which a plain
    DataLoader applies to what `__getitems__` returns, rebuilds the same batch."""

    def __init__(self, *tensors: Tensor):
        self.batch = tensors

    def __len__(self) -> int:
        return len(self.batch[0])

    def __getitem__(self, i):
        return tuple(t[i] for t in self.batch)


def batch_collate(batch):
    """Collate for distill's loaders: a batch a dataset gathered itself (``StackedRows``, or the tuple a text or
    cached dataset returns) is taken as is; a list of rows (any other dataset) goes through PyTorch's default collate."""
    if isinstance(batch, StackedRows):
        return batch.batch
    if isinstance(batch, tuple):
        return batch
    return torch.utils.data.default_collate(batch)


def gather(dataset, indices: list[int]):
    """The collated batch of rows `indices` of a dataset that gathers its own batches (``__getitems__``)."""
    return batch_collate(dataset.__getitems__(indices))


@dataclass
class DataSplits:
    name: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]


def check_fractions(val_fraction: float, test_fraction: float, unlabelled_fraction: float) -> None:
    """Raise UserError naming the argument if a fraction is outside [0, 1) or val + test >= 1."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction),
                        ("unlabelled_fraction", unlabelled_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1):
            raise UserError(f"{name} must be a number with 0 <= {name} < 1, got {value!r}: pass a value such as 0.1.")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"val_fraction + test_fraction must be below 1 (got {val_fraction} + {test_fraction}): "
                        "lower one of them so rows are left for training.")


def _count(fraction: float, n: int) -> int:
    """Rows for a fraction of n: rounded, at least 1 when the fraction is positive."""
    if fraction <= 0 or n == 0:
        return 0
    return min(n, max(1, int(round(fraction * n))))


def split_off(indices: np.ndarray, labels: np.ndarray, n_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, taken) with ``len(taken) == n_out``, stratified on ``labels`` when possible.

    Falls back to an unstratified seeded split when a class is too small to stratify.
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels)
    if n_out <= 0:
        return indices, indices[:0]
    if n_out >= len(indices):
        raise UserError(f"Too few labelled rows ({len(indices)}) to split off {n_out}: "
                        "use a larger dataset or smaller val_fraction/test_fraction/unlabelled_fraction.")
    try:
        kept, taken = train_test_split(indices, test_size=n_out, random_state=seed, stratify=labels)
    except ValueError:
        kept, taken = train_test_split(indices, test_size=n_out, random_state=seed, stratify=None)
    return np.sort(kept), np.sort(taken)


def split_labelled(y: np.ndarray, val_fraction: float, test_fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded stratified train/val/test row indices for labels ``y`` (-1 = unlabelled).

    Both fractions are of the labelled rows: test is taken first, then val from the rest, so with
    0.1/0.2 the labelled rows split 70/10/20. Unlabelled rows always go to train.
    """
    y = np.asarray(y)
    all_idx = np.arange(len(y), dtype=np.int64)
    labelled = all_idx[y != UNLABELLED]
    unlabelled = all_idx[y == UNLABELLED]
    n = len(labelled)
    n_test, n_val = _count(test_fraction, n), _count(val_fraction, n)
    rest, test = split_off(labelled, y[labelled], n_test, seed)
    train, val = split_off(rest, y[rest], n_val, seed)
    return np.sort(np.concatenate([train, unlabelled])), val, test


def hide_labels(y: Tensor, fraction: float, seed: int) -> Tensor:
    """Copy of ``y`` with the labels of a seeded stratified ``fraction`` of its labelled rows set to -1."""
    y = y.clone()
    if fraction <= 0:
        return y
    y_np = y.numpy()
    labelled = np.flatnonzero(y_np != UNLABELLED)
    _, hidden = split_off(labelled, y_np[labelled], _count(fraction, len(labelled)), seed)
    y[torch.from_numpy(hidden)] = UNLABELLED
    return y


def make_splits(name: str, x: Tensor, y: Tensor, *, val_fraction: float, test_fraction: float,
                unlabelled_fraction: float, seed: int, num_classes: int,
                class_names: list[str]) -> DataSplits:
    """Split one labelled pool (x, y) into train/val/test and hide train labels as asked."""
    train, val, test = split_labelled(y.numpy(), val_fraction, test_fraction, seed)
    return bundle(name, x, y, train, val, test, unlabelled_fraction=unlabelled_fraction, seed=seed,
                  num_classes=num_classes, class_names=class_names)


def bundle(name: str, x: Tensor, y: Tensor, train: np.ndarray, val: np.ndarray, test: np.ndarray, *,
           unlabelled_fraction: float, seed: int, num_classes: int, class_names: list[str]) -> DataSplits:
    """DataSplits from row indices into (x, y); hides a fraction of the train labels."""
    def take(idx: np.ndarray) -> ArrayDataset:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return ArrayDataset(x[t].contiguous(), y[t].clone())

    train_ds = take(train)
    train_ds.y = hide_labels(train_ds.y, unlabelled_fraction, seed)
    return DataSplits(name=name, train=train_ds, val=take(val), test=take(test), num_classes=num_classes,
                      input_shape=tuple(int(s) for s in x.shape[1:]), class_names=list(class_names))

