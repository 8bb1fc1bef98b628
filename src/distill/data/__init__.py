"""Datasets for distillation: in-memory train/val/test splits of image and tabular classification data.

``load_dataset(name, ...)`` returns a :class:`DataSplits` of :class:`ArrayDataset` (x float32, y int64,
label -1 = unlabelled). Splits are seeded and stratified; only the train split ever has hidden labels.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

from distill.data.arrays import ArrayDataset, DataSplits, check_fractions
from distill.errors import UserError

__all__ = ["load_dataset", "DataSplits", "ArrayDataset", "DATASETS", "TEXT_DATASETS", "LM_DATASETS", "resolve_data_dir"]

LM_DATASETS = ("imdb-lm", "lm")  # causal language modelling (distill.tasks.causal_lm)
TEXT_DATASETS = ("imdb", "text", "conll", "en-es", "parallel", *LM_DATASETS)  # loaded by the text tasks (distill.tasks), with the teacher's tokenizer
DATASETS = ("digits", "mnist", "fashion-mnist", "table", "image-folder", *TEXT_DATASETS)

DEFAULT_DATA_DIR = Path("~/.cache/distill/data")


def resolve_data_dir(data_dir: str | None) -> Path:
    """explicit data_dir > env DISTILL_DATA_DIR > ~/.cache/distill/data"""
    chosen = data_dir or os.environ.get("DISTILL_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def load_dataset(name: str, *, path: str | None = None, data_dir: str | None = None,
                 label_column: str = "label", feature_columns: list[str] | None = None,
                 image_size: tuple[int, int] = (28, 28), grayscale: bool = True,
                 val_fraction: float = 0.1, test_fraction: float = 0.2,
                 unlabelled_fraction: float = 0.0, seed: int = 0, download: bool = True) -> DataSplits:
    """Load one of DATASETS as seeded, stratified train/val/test splits.

    - digits: sklearn's 8x8 digits, (1, 8, 8); test_fraction held out as test.
    - mnist / fashion-mnist: IDX files in ``<dir>/<name>/`` or ``<dir>`` (dir = path or resolve_data_dir),
      downloaded there if missing and ``download``; val = val_fraction of the official train set,
      test = the official test set (test_fraction is ignored).
    - table: ``path`` to a .csv/.parquet; features standardised with train-split statistics.
    - image-folder: ``path`` to ``root/<class>/<image>``; (C, H, W) with image_size = (H, W).
    val_fraction and test_fraction are fractions of all labelled rows (0.1/0.2 -> 70/10/20);
    unlabelled_fraction hides (label -1) a stratified fraction of the train split's labels.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise UserError(f"Unknown dataset {name!r}: choose one of {', '.join(DATASETS)}.")
    check_fractions(val_fraction, test_fraction, unlabelled_fraction)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise UserError(f"seed must be an integer, got {seed!r}: pass e.g. seed=0.")
    seed = int(seed)

    if key in TEXT_DATASETS:
        raise UserError(f"dataset {key!r} is text: it is read with the teacher's tokenizer by its task "
                        "(distill.tasks.make_task(recipe).load_data()), not by load_dataset")
    if key == "digits":
        from distill.data.digits import load_digits_splits
        return load_digits_splits(val_fraction=val_fraction, test_fraction=test_fraction,
                                  unlabelled_fraction=unlabelled_fraction, seed=seed)
    if key in ("mnist", "fashion-mnist"):
        from distill.data.idx import load_idx_dataset
        base = Path(path).expanduser() if path else resolve_data_dir(data_dir)
        return load_idx_dataset(key, base=base, explicit_path=bool(path), val_fraction=val_fraction,
                                unlabelled_fraction=unlabelled_fraction, seed=seed, download=download)
    if not path:
        what = "a .csv or .parquet file" if key == "table" else "a folder with one sub-folder of images per class"
        raise UserError(f"Dataset {key!r} needs a path: pass path pointing to {what}.")
    if key == "table":
        from distill.data.table import load_table
        return load_table(path, label_column=label_column, feature_columns=feature_columns,
                          val_fraction=val_fraction, test_fraction=test_fraction,
                          unlabelled_fraction=unlabelled_fraction, seed=seed)
    from distill.data.images import load_image_folder
    return load_image_folder(path, image_size=image_size, grayscale=grayscale, val_fraction=val_fraction,
                             test_fraction=test_fraction, unlabelled_fraction=unlabelled_fraction, seed=seed)
