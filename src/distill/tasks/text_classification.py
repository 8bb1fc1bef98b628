"""Text classification: one label per text (IMDB sentiment, or a user's CSV/TSV/JSONL); accuracy picks the best epoch.

IMDB (Maas et al. 2011, data.dataset: imdb): the 50,000 reviews of `<data_dir>/imdb/reviews.jsonl.gz`, split by a
seeded, stratified draw (data.split_seed) into test_rows / val_rows / train_rows disjoint reviews (defaults 2000 /
1000 / 4000, so a CPU run takes minutes; the rest is unused), truncated to data.max_length tokens.
Own data (data.dataset: text): data.path with data.text_column and data.label_column; rows with an empty label are
unlabelled (pseudo-labels); val_fraction / test_fraction of the labelled rows are held out, stratified.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from distill.data import resolve_data_dir
from distill.data.text import UNLABELLED, TextSplits, read_imdb, read_text_table, tokenize_sentences
from distill.errors import UserError
from distill.tasks.classification import evaluate, majority_accuracy
from distill.tasks.text import TextTask

IMDB_CLASSES = ["negative", "positive"]
IMDB_DATASETS = ("imdb", "imdb-lm")  # the same reviews split alike: a language model's test reviews are the classifier's
IMDB_DEFAULT_ROWS = (4000, 1000, 2000)  # train, val, test reviews when data.*_rows are not set


class TextClassificationTask(TextTask):
    name = "text-classification"
    metric = "accuracy"
    token_level = False

    def baseline_score(self, data) -> float | None:
        return majority_accuracy(data.train.y, data.test.y)

    def evaluate(self, model, data, *, device="cpu", batch_size: int = 64) -> dict:
        return evaluate(model, data, batch_size=batch_size, device=device)

    def load_data(self) -> TextSplits:
        d = self.recipe.data
        if d.dataset == "imdb":
            texts, y = read_imdb_reviews(d)
            names = IMDB_CLASSES
        else:
            if not d.path:
                raise UserError("data.dataset text needs data.path: a .csv, .tsv or .jsonl file with a text and a label column")
            texts, raw = read_text_table(Path(d.path).expanduser(), d.text_column, d.label_column)
            names = _class_names([v for v in raw if v != ""])
            index = {n: i for i, n in enumerate(names)}
            y = np.asarray([index[v] if v != "" else UNLABELLED for v in raw])
        teacher_names = self.teacher_label_names()
        if teacher_names:  # a fine-tuned teacher's label order wins
            if sorted(teacher_names) != sorted(names):
                raise UserError(f"the teacher predicts labels {teacher_names} but the data has {names}: use a teacher "
                                "fine-tuned on these labels, or a base model")
            remap = np.asarray([teacher_names.index(n) for n in names])
            y = np.where(y >= 0, remap[np.maximum(y, 0)], UNLABELLED)
            names = teacher_names
        train, val, test, hidden = split_labelled(y, d)
        y = y.copy()
        y[hidden] = UNLABELLED  # unlabelled_rows: reviews whose labels no model ever sees
        if len(train) == 0 or len(test) == 0:
            raise UserError(f"{d.dataset}: too few rows for the split (train {len(train)}, test {len(test)}): add data or lower the fractions")
        tok = lambda idx: tokenize_sentences(self.tokenizer, [texts[i] for i in idx], torch.as_tensor(y[idx]), d.max_length)  # noqa: E731
        splits = TextSplits(d.dataset, tok(train), tok(val), tok(test), len(names), list(names), token_level=False)
        if d.unlabelled_fraction:
            rng = np.random.default_rng(d.split_seed)
            labelled = np.flatnonzero(splits.train.labelled())
            splits.train.hide_labels(rng.choice(labelled, int(round(d.unlabelled_fraction * len(labelled))), replace=False))
        return splits


def _class_names(values: list[str]) -> list[str]:
    unique = sorted(set(values))
    if not unique:
        raise UserError("data.label_column holds no labels: give at least two labelled classes")
    try:
        return sorted(unique, key=float)  # numbers in numeric order (2 before 10)
    except ValueError:
        return unique


def read_imdb_reviews(d) -> tuple[list[str], np.ndarray]:
    """(texts, sentiment labels) of the 50,000 reviews: data.path, else <data_dir>/imdb, holding reviews.jsonl.gz."""
    base = Path(d.path).expanduser() if d.path else resolve_data_dir(d.data_dir)
    return read_imdb(base / "imdb" / "reviews.jsonl.gz" if (base / "imdb").is_dir() else base / "reviews.jsonl.gz")


def split_labelled(y: np.ndarray, d) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/val/test indices (test and val stratified by class) of the labelled rows; unlabelled rows join
    train. Row caps (train_rows / val_rows / test_rows, IMDB defaults IMDB_DEFAULT_ROWS) are seeded draws, and
    unlabelled_rows more rows, drawn from the labelled rows left over, join train with their labels hidden
    (returned as the 4th array)."""
    labelled, unlabelled = np.flatnonzero(y >= 0), np.flatnonzero(y < 0)
    caps = {"train": d.train_rows, "val": d.val_rows, "test": d.test_rows}
    if d.dataset in IMDB_DATASETS:
        caps = {k: v or default for (k, v), default in zip(caps.items(), IMDB_DEFAULT_ROWS)}
        n_test, n_val = caps["test"], caps["val"]
    else:
        n_test, n_val = int(round(d.test_fraction * len(labelled))), int(round(d.val_fraction * len(labelled)))
    try:
        rest, test = train_test_split(labelled, test_size=n_test, random_state=d.split_seed, stratify=y[labelled])
        train, val = (train_test_split(rest, test_size=n_val, random_state=d.split_seed, stratify=y[rest])
                      if n_val else (rest, rest[:0]))
    except ValueError as e:
        raise UserError(f"data: cannot split {len(labelled)} labelled rows by class ({e}): add rows or lower val/test sizes") from None
    rng = np.random.default_rng(d.split_seed)
    picked = {}
    for name, idx in (("train", train), ("val", val), ("test", test)):
        cap = caps[name]
        if cap is not None and cap < len(idx):
            idx = rng.choice(idx, cap, replace=False)
        picked[name] = np.sort(idx)
    extra = np.setdiff1d(train, picked["train"])  # labelled rows left over: the pool of unlabelled_rows
    if d.unlabelled_rows > len(extra):
        raise UserError(f"data.unlabelled_rows={d.unlabelled_rows} but only {len(extra)} rows are left beside the splits: "
                        "lower it or data.train_rows")
    hidden = np.sort(rng.choice(extra, d.unlabelled_rows, replace=False)) if d.unlabelled_rows else extra[:0]
    return np.concatenate([picked["train"], unlabelled, hidden]), picked["val"], picked["test"], hidden
