"""A CSV or Parquet table: numeric feature columns plus one label column.

Labels: the distinct non-missing values, sorted, become classes 0..K-1 (class_names = their str());
rows with a missing label become -1 (unlabelled) and always land in train. Features are standardised
with the mean/std of the training split (std 0 -> 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from distill.data.arrays import DataSplits, bundle, split_labelled
from distill.errors import UserError

SUFFIXES = (".csv", ".parquet")


def read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"Table {path} has suffix {path.suffix or '(none)'!r}: "
                        "give a .csv or .parquet file (the suffix decides the format).")
    if not path.is_file():
        raise UserError(f"Table {path} does not exist: pass the path of an existing .csv or .parquet file.")
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except Exception as e:  # parser errors come in many types (pandas, pyarrow, OSError, UnicodeDecodeError)
        kind = "CSV" if suffix == ".csv" else "Parquet"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Cannot read {path} as {kind} ({first}): check that the file is a valid {kind} table.") \
            from None


def _label_missing(labels: pd.Series) -> np.ndarray:
    missing = labels.isna().to_numpy()
    if labels.dtype == object or pd.api.types.is_string_dtype(labels.dtype):
        blank = labels.map(lambda v: isinstance(v, str) and v.strip() == "").to_numpy(dtype=bool)
        missing = missing | blank
    return missing


def _class_values(values: np.ndarray) -> list:
    distinct = list(pd.unique(values))
    try:
        distinct.sort()
    except TypeError:  # mixed types, e.g. ints and strings in one object column
        distinct.sort(key=str)
    return distinct


def _name(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))  # a numeric label column with NaN is read as float: show 1, not 1.0
    if isinstance(v, np.generic):
        v = v.item()
    return str(v)


def load_table(path: str, *, label_column: str, feature_columns: list[str] | None, val_fraction: float,
               test_fraction: float, unlabelled_fraction: float, seed: int) -> DataSplits:
    p = Path(path).expanduser()
    df = read_table(p)
    columns = [str(c) for c in df.columns]
    df.columns = columns
    if label_column not in columns:
        raise UserError(f"Label column {label_column!r} is not in {p}; available columns: {', '.join(columns)} "
                        "(set label_column to one of them).")
    if feature_columns is None:
        features = [c for c in columns if c != label_column]
    else:
        features = [str(c) for c in feature_columns]
        unknown = [c for c in features if c not in columns]
        if unknown:
            raise UserError(f"Feature column(s) {', '.join(map(repr, unknown))} not in {p}; available columns: "
                            f"{', '.join(columns)} (fix feature_columns).")
        if label_column in features:
            raise UserError(f"Label column {label_column!r} is also listed in feature_columns: remove it from them.")
    if not features:
        raise UserError(f"{p} has no feature columns besides {label_column!r}: add numeric feature columns.")
    for c in features:
        if not pd.api.types.is_numeric_dtype(df[c].dtype):
            raise UserError(f"Feature column {c!r} in {p} is not numeric (dtype {df[c].dtype}): "
                            "encode it as numbers or leave it out of feature_columns.")
    if len(df) == 0:
        raise UserError(f"{p} has no rows: give a table with data.")

    labels = df[label_column]
    missing = _label_missing(labels)
    values = labels[~missing].to_numpy()
    classes = _class_values(values)
    if len(classes) < 2:
        raise UserError(f"Label column {label_column!r} in {p} has {len(classes)} distinct value(s): "
                        "a classifier needs at least 2 classes.")
    index = {v: i for i, v in enumerate(classes)}
    y_np = np.full(len(df), -1, dtype=np.int64)
    y_np[~missing] = [index[v] for v in values]

    x_np = df[features].to_numpy(dtype=np.float64)
    for j in np.flatnonzero(~np.isfinite(x_np).all(axis=0)):
        bad = int((~np.isfinite(x_np[:, j])).sum())
        raise UserError(f"Feature column {features[j]!r} in {p} has {bad} missing or infinite value(s): "
                        "fill or drop those rows first.")
    train, val, test = split_labelled(y_np, val_fraction, test_fraction, seed)
    mean = x_np[train].mean(axis=0)
    std = x_np[train].std(axis=0)
    std[~(std > 0)] = 1.0
    x = torch.from_numpy(((x_np - mean) / std).astype(np.float32))
    y = torch.from_numpy(y_np)
    return bundle("table", x, y, train, val, test, unlabelled_fraction=unlabelled_fraction, seed=seed,
                  num_classes=len(classes), class_names=[_name(v) for v in classes])
