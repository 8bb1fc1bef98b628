"""Train / validation / test splits of a user's rows (translation pairs, language-model examples): a folder holding
one file per split, or one file split by seeded fractions; every split optionally capped by a seeded draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.errors import UserError

SPLIT_FILES = {"train": "train", "val": "valid", "test": "test"}  # split -> file stem in a data folder


def split_files(path: Path, kinds: str) -> dict[str, Path] | None:
    """{split: file} of a folder holding train.* / valid.* / test.* (the first of each, by name); None when `path`
    is a file. `kinds` names the file types the task reads, for the refusal of a folder that lacks one."""
    if not path.is_dir():
        return None
    found = {split: sorted(path.glob(f"{stem}.*")) for split, stem in SPLIT_FILES.items()}
    missing = [SPLIT_FILES[s] for s, files in found.items() if not files]
    if missing:
        raise UserError(f"{path} has no {missing[0]}.{kinds}: a folder needs train, valid and test files")
    return {split: files[0] for split, files in found.items()}


def split_by_fraction(rows: list, data_cfg) -> dict[str, list]:
    """One file's rows split by a seeded permutation (data.split_seed): data.test_fraction of them for test,
    data.val_fraction for validation, the rest for training; each split keeps the file's order."""
    order = np.random.default_rng(data_cfg.split_seed).permutation(len(rows))
    n_test = int(round(data_cfg.test_fraction * len(rows)))
    n_val = int(round(data_cfg.val_fraction * len(rows)))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {split: [rows[i] for i in np.sort(idx)] for split, idx in parts.items()}


def cap_splits(splits: dict[str, list], data_cfg, what: str) -> dict[str, list]:
    """Each split cut to data.train_rows / val_rows / test_rows by a seeded draw (kept in order); an empty split is
    refused. `what` names the rows ("sentence pairs", "examples") in that refusal."""
    caps = {"train": data_cfg.train_rows, "val": data_cfg.val_rows, "test": data_cfg.test_rows}
    rng = np.random.default_rng(data_cfg.split_seed)
    out = {}
    for split, cap in caps.items():  # in this order: the draws of a seed stay what they were
        rows = splits[split]
        if cap is not None and len(rows) > cap:
            keep = np.sort(rng.choice(len(rows), cap, replace=False))
            rows = [rows[i] for i in keep]
        if not rows:
            raise UserError(f"{data_cfg.dataset}: the {split} split has no {what}: add data or lower the fractions")
        out[split] = rows
    return out
