"""Text data: reading sentences and labels, tokenising them with the teacher's tokenizer, and padded batches.

A `TokenizedText` holds token ids per row (special tokens included, truncated to max_length) and collates its
own batches (`__getitems__`): `({"input_ids", "attention_mask"[, "word_mask"]}, y)`, padded to the longest row of
the batch. Sentence labels: y [B]. Tags: `word_mask` [B, L] is True at the first sub-token of every word, and y
holds those words' tags in row-major order, so a tagger's logits at `word_mask` line up with y (sub-word
continuations, special tokens and padding never count). Label -1 = unlabelled (a pseudo-label from the teacher).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.errors import UserError

UNLABELLED = -1


class TokenizedText(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]], y: Tensor | None, pad_id: int, *, word_starts: list[list[int]] | None = None,
                 tags: list[Tensor] | None = None):
        self.ids, self.pad_id = ids, pad_id
        self.y = y  # sentence labels [N] (None for tagging)
        self.word_starts, self.tags = word_starts, tags  # tagging: positions of the counted sub-tokens, their tags
        if (y is None) == (tags is None):
            raise ValueError("TokenizedText needs sentence labels y or word tags, not both")

    @property
    def token_level(self) -> bool:
        return self.tags is not None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]):
        rows = [self.ids[i] for i in indices]
        input_ids, attention_mask = pad_rows(rows, self.pad_id)
        length = input_ids.shape[1]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if not self.token_level:
            return inputs, self.y[torch.as_tensor(indices, dtype=torch.long)]
        word_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for b, i in enumerate(indices):
            word_mask[b, self.word_starts[i]] = True
        inputs["word_mask"] = word_mask
        return inputs, torch.cat([self.tags[i] for i in indices])

    def lengths(self) -> np.ndarray:
        """Tokens per example (batches of similar length pad less: distill.batching)."""
        return np.array([len(r) for r in self.ids], dtype=np.int64)

    def row_counts(self) -> np.ndarray:
        """Label rows per example: 1 per sentence, or its counted words (what a cache stores per example)."""
        if self.token_level:
            return np.array([len(t) for t in self.tags], dtype=np.int64)
        return np.ones(len(self.ids), dtype=np.int64)

    def sha256(self) -> str:
        """Of the token ids, labels and counted positions: what identifies the rows a teacher cache was written for."""
        h = hashlib.sha256()
        lengths = np.array([len(r) for r in self.ids], dtype=np.int64)
        h.update(f"tokenized {len(self.ids)} pad {self.pad_id} token_level {self.token_level}\n".encode())
        h.update(lengths.tobytes())
        h.update(np.concatenate([np.asarray(r, dtype=np.int64) for r in self.ids]).tobytes())
        if self.token_level:
            h.update(np.concatenate([np.asarray(s, dtype=np.int64) for s in self.word_starts] or [np.zeros(0, np.int64)]).tobytes())
            h.update(torch.cat(self.tags).numpy().astype(np.int64).tobytes())
        else:
            h.update(self.y.numpy().astype(np.int64).tobytes())
        return h.hexdigest()

    def subset(self, indices) -> "TokenizedText":
        indices = [int(i) for i in indices]
        if self.token_level:
            return TokenizedText([self.ids[i] for i in indices], None, self.pad_id,
                                 word_starts=[self.word_starts[i] for i in indices], tags=[self.tags[i] for i in indices])
        return TokenizedText([self.ids[i] for i in indices], self.y[torch.as_tensor(indices, dtype=torch.long)], self.pad_id)

    def hide_labels(self, indices) -> None:
        """Mark rows as unlabelled (every word of a sentence, for tags)."""
        for i in indices:
            if self.token_level:
                self.tags[int(i)] = torch.full_like(self.tags[int(i)], UNLABELLED)
            else:
                self.y[int(i)] = UNLABELLED

    def labelled(self) -> np.ndarray:
        """Per row: has labels (used to keep unlabelled rows out of evaluation splits and stratification)."""
        if self.token_level:
            return np.array([bool((t >= 0).any()) for t in self.tags])
        return (self.y >= 0).numpy()


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, attention mask) of token rows right-padded to the longest: [B, L] each."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    return ids, mask


@dataclass
class TextSplits:
    name: str
    train: TokenizedText
    val: TokenizedText
    test: TokenizedText
    num_classes: int
    class_names: list[str]
    token_level: bool


# ----------------------------------------------------------------------------- tokenising
def tokenize_sentences(tokenizer, texts: list[str], labels: Tensor, max_length: int) -> TokenizedText:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return TokenizedText(ids, labels, tokenizer.pad_token_id)


def tokenize_words(tokenizer, sentences: list[list[str]], tags: list[list[int]], max_length: int) -> TokenizedText:
    """Sub-tokens of pre-split words; the first sub-token of each word carries the word's tag, the others and the
    special tokens carry nothing. Words cut off by max_length are dropped (with their tags)."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"tagging needs a fast tokenizer (it maps sub-tokens to words), but {type(tokenizer).__name__} "
                        "is not one: save the tokenizer with tokenizer.json (transformers' *TokenizerFast)")
    enc = tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=max_length)
    starts, kept = [], []
    for i, words in enumerate(sentences):
        word_ids = enc.word_ids(i)
        first = [p for p, w in enumerate(word_ids) if w is not None and (p == 0 or word_ids[p - 1] != w)]
        starts.append(first)
        kept.append(torch.as_tensor([tags[i][word_ids[p]] for p in first], dtype=torch.long))
    return TokenizedText(enc["input_ids"], None, tokenizer.pad_token_id, word_starts=starts, tags=kept)


# ----------------------------------------------------------------------------- reading
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_imdb(path: Path) -> tuple[list[str], np.ndarray]:
    """reviews.jsonl.gz of Maas et al. 2011: {"id", "text", "label"}; `<br />` tags become spaces."""
    if not path.is_file():
        raise UserError(f"IMDB reviews not found at {path}: set data.data_dir to the folder holding imdb/reviews.jsonl.gz")
    texts, labels = [], []
    with _open_text(path) as f:
        for line in f:
            row = json.loads(line)
            texts.append(" ".join(row["text"].replace("<br />", " ").split()))
            labels.append(int(row["label"]))
    return texts, np.asarray(labels)


def read_text_table(path: Path, text_column: str, label_column: str) -> tuple[list[str], list]:
    """A .csv / .tsv / .jsonl file with a text column and a label column; an empty label = an unlabelled row."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"data.path {path} is not a file: give a .csv, .tsv or .jsonl file with columns "
                        f"{text_column!r} and {label_column!r}")
    try:
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            frame = pd.read_csv(path, sep="\t" if ".tsv" in path.name else ",", dtype=str, keep_default_na=False)
    except ValueError as e:
        raise UserError(f"data.path {path} cannot be read as a table ({str(e).splitlines()[0]}): give UTF-8 CSV/TSV/JSONL") from None
    for column, field in ((text_column, "text_column"), (label_column, "label_column")):
        if column not in frame.columns:
            raise UserError(f"data.{field}: {path} has no column {column!r}; its columns are {', '.join(map(str, frame.columns))}")
    texts = frame[text_column].fillna("").astype(str).str.strip()
    empty = np.flatnonzero((texts == "").to_numpy())
    if len(empty):
        raise UserError(f"data.text_column {text_column!r} of {path} is empty in row {int(empty[0]) + 1} "
                        f"({len(empty)} empty in all): fill or drop those rows")
    labels = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip() for v in frame[label_column]]
    return texts.tolist(), labels


def read_conll(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """CoNLL-style: one `token ... tag` per line (first and last whitespace-separated columns), a blank line between
    sentences, `-DOCSTART-` lines skipped. A line with one column is refused with its line number."""
    if not path.is_file():
        raise UserError(f"CoNLL file {path} not found: give data.path as a file, or a folder with train/valid/test files")
    sentences, tags, words, word_tags = [], [], [], []
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                if words:
                    sentences.append(words), tags.append(word_tags)
                    words, word_tags = [], []
                continue
            if len(parts) < 2:
                raise UserError(f"{path} line {number}: {line.strip()!r} has no tag: each line must be `token tag` "
                                "(whitespace-separated), with a blank line between sentences")
            words.append(parts[0]), word_tags.append(parts[-1])
    if words:
        sentences.append(words), tags.append(word_tags)
    if not sentences:
        raise UserError(f"CoNLL file {path} holds no sentences: each line must be `token tag`")
    return sentences, tags
