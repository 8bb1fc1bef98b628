"""Token tagging (named entities, BIO tags): a tag per word; entity-level F1 (seqeval) picks the best epoch.

Data (data.dataset: conll): data.path is a CoNLL file (`token tag` per line, blank line between sentences), split
by val_fraction / test_fraction (seeded), or a folder holding train / valid (or dev) / test files (.conll, .txt,
optionally .gz). Words are split into the teacher tokenizer's sub-tokens; the first sub-token of each word carries
its tag and is the only one that counts (distill.data.text). Evaluation is on the words that fit data.max_length.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device

from distill.data.text import TextSplits, read_conll, tokenize_words
from distill.errors import UserError
from distill.tasks.classification import _batches
from distill.tasks.text import TextTask

SPLIT_NAMES = {"train": ("train",), "val": ("valid", "dev", "val"), "test": ("test",)}


class TaggingTask(TextTask):
    name = "tagging"
    metric = "entity_f1"
    token_level = True
    tie_break_on_loss = True
    variable_rows = True

    @torch.inference_mode()
    def evaluate(self, model, data, *, device="cpu", batch_size: int = 128) -> dict:
        """Entity-level precision / recall / F1 (seqeval, CoNLL scheme: an entity counts when its type and both
        ends match), token accuracy and mean cross-entropy per word, over the labelled sentences."""
        from seqeval.metrics import f1_score, precision_score, recall_score

        was_training = model.training
        model.eval()
        gold, pred, loss_sum, correct, words = [], [], 0.0, 0, 0
        names = self.class_names
        for inputs, y in _batches(data, batch_size):
            inputs, y = send_to_device(inputs, device), y.to(device)
            logits = model(inputs).float()
            counts = inputs["word_mask"].sum(1).tolist()
            for t, p in zip(y.split(counts), logits.argmax(-1).split(counts)):
                if len(t) and bool((t >= 0).all()):
                    gold.append([names[i] for i in t.tolist()]), pred.append([names[i] for i in p.tolist()])
            keep = y >= 0
            loss_sum += F.cross_entropy(logits[keep], y[keep], reduction="sum").item()
            correct += int((logits.argmax(-1)[keep] == y[keep]).sum())
            words += int(keep.sum())
        model.train(was_training)
        if not gold:
            return {"score": float("nan"), "entity_f1": float("nan"), "loss": float("nan"), "n": 0}
        f1 = float(f1_score(gold, pred, zero_division=0))
        return {"score": f1, "entity_f1": f1, "entity_precision": float(precision_score(gold, pred, zero_division=0)),
                "entity_recall": float(recall_score(gold, pred, zero_division=0)), "token_accuracy": correct / words,
                "loss": loss_sum / words, "n": words, "sentences": len(gold)}

    def load_data(self) -> TextSplits:
        d = self.recipe.data
        if not d.path:
            raise UserError("data.dataset conll needs data.path: a CoNLL file or a folder with train/valid/test files")
        parts = _read_parts(Path(d.path).expanduser(), d)
        tags = sorted({t for _, sentence_tags in parts.values() for s in sentence_tags for t in s})
        bad = [t for t in tags if t != "O" and not re.fullmatch(r"[BIESLU]-\S+", t)]
        if bad:
            raise UserError(f"{d.path}: tag {bad[0]!r} is not an entity tag: entity F1 needs O and B-/I- (or E-/S-) "
                            "prefixed tags such as B-PER, I-PER")
        names = ["O", *[t for t in tags if t != "O"]] if "O" in tags else tags
        teacher_names = self.teacher_label_names()
        if teacher_names:  # a fine-tuned teacher's tag order wins; tags it does not know are refused
            unknown = sorted(set(names) - set(teacher_names))
            if unknown:
                raise UserError(f"the teacher's head predicts tags {teacher_names}, not the data's {unknown}: use a "
                                "teacher fine-tuned on these tags, or a base model")
            names = teacher_names
        self.class_names = names
        index = {n: i for i, n in enumerate(names)}
        tok = lambda s, t: tokenize_words(self.tokenizer, s, [[index[x] for x in row] for row in t], d.max_length)  # noqa: E731
        splits = TextSplits(d.path, *(tok(*parts[k]) for k in ("train", "val", "test")), len(names), names, token_level=True)
        if len(splits.train) == 0 or len(splits.test) == 0:
            raise UserError(f"{d.path}: no training or test sentences after the split: add sentences or lower the fractions")
        if d.unlabelled_fraction:
            rng = np.random.default_rng(d.split_seed)
            n = int(round(d.unlabelled_fraction * len(splits.train)))
            splits.train.hide_labels(rng.choice(len(splits.train), n, replace=False))
        return splits

    def load_model(self, folder, data):
        self.class_names = list(data.class_names)
        return super().load_model(folder, data)


def _read_parts(path: Path, d) -> dict[str, tuple[list, list]]:
    """{"train" | "val" | "test": (sentences, tags)}, from a folder of three files or one file split by sentence."""
    if path.is_dir():
        files = {}
        for part, stems in SPLIT_NAMES.items():
            found = [f for f in sorted(path.iterdir()) if f.name.split(".")[0] in stems]
            if not found:
                raise UserError(f"data.path {path} has no {part} file: name them train / valid (or dev) / test "
                                "(.conll, .txt, optionally .gz)")
            files[part] = read_conll(found[0])
        return _capped(files, d)
    sentences, tags = read_conll(path)
    order = np.random.default_rng(d.split_seed).permutation(len(sentences))
    n_test, n_val = int(round(d.test_fraction * len(order))), int(round(d.val_fraction * len(order)))
    pick = lambda idx: ([sentences[i] for i in sorted(idx)], [tags[i] for i in sorted(idx)])  # noqa: E731
    parts = {"test": pick(order[:n_test]), "val": pick(order[n_test:n_test + n_val]), "train": pick(order[n_test + n_val:])}
    return _capped(parts, d)


def _capped(parts: dict, d) -> dict:
    """data.train_rows / val_rows / test_rows: the first N sentences (a seeded draw) of each part."""
    out = {}
    for part, (sentences, tags) in parts.items():
        cap = getattr(d, f"{part}_rows")
        if cap is not None and cap < len(sentences):
            idx = sorted(np.random.default_rng(d.split_seed).choice(len(sentences), cap, replace=False))
            sentences, tags = [sentences[i] for i in idx], [tags[i] for i in idx]
        out[part] = (sentences, tags)
    return out
