"""scikit-learn's 8x8 handwritten digits (1,797 images, bundled with sklearn, no download)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from distill.data.arrays import DataSplits, make_splits


def load_digits_splits(*, val_fraction: float, test_fraction: float, unlabelled_fraction: float,
                       seed: int) -> DataSplits:
    """Digits as float32 (N, 1, 8, 8) in [0, 1]; no official test split, so a seeded stratified one is held out."""
    bunch = load_digits()
    x = torch.from_numpy((np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8))
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return make_splits("digits", x, y, val_fraction=val_fraction, test_fraction=test_fraction,
                       unlabelled_fraction=unlabelled_fraction, seed=seed, num_classes=10,
                       class_names=[str(i) for i in range(10)])
