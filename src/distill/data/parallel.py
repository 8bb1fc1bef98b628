"""Parallel text for translation: reading sentence pairs, a subword tokenizer trained on them, and the batches a
seq2seq model trains on.

A batch is `(inputs, y)` like every task's: inputs = {"input_ids", "attention_mask" (source), "decoder_input_ids",
"decoder_attention_mask"} (the target shifted right behind the decoder start token, teacher forcing), and y holds
the target tokens of every counted position (each real target token and the closing </s>, row-major), so a model
that returns the logits at `decoder_attention_mask` gives `[N, V]` rows in the order of y and every KD method of the
zoo works per target token. Padding never counts.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from distill.data.text import pad_rows
from distill.errors import UserError

SPECIAL_TOKENS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}


# ----------------------------------------------------------------------------- reading pairs
def open_text(path: Path):
    """The whole file as text (gzip when it ends in .gz); unreadable or non-UTF-8 files refused with one line."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return io.StringIO(raw.decode("utf-8"), newline="")
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or type(e).__name__}): give a readable file") from None
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path} is not UTF-8 text ({type(e).__name__}): give a .tsv, .jsonl or .txt file in UTF-8") from None


def _check_pair(path: Path, line: int, source, target) -> tuple[str, str]:
    if not isinstance(source, str) or not isinstance(target, str):
        raise UserError(f"{path} line {line}: the source and target must be text: fix or remove that line")
    source, target = source.strip(), target.strip()
    if not source or not target:
        side = "source" if not source else "target"
        raise UserError(f"{path} line {line}: empty {side} sentence: remove that line or fill it in")
    return source, target


def read_pairs(path, *, source_column="source", target_column="target", target_path=None) -> list[tuple[str, str]]:
    """Sentence pairs from a TSV (header row naming the columns, or no header with columns given as 0-based
    integers), a JSONL file (one object per line), or two aligned text files (path = source, target_path = target,
    one sentence per line). Files may be gzipped. Every refusal names the file and line."""
    path = Path(path)
    if target_path is not None:
        return _read_aligned(path, Path(target_path))
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        return _read_jsonl(path, source_column, target_column)
    if name.endswith((".tsv", ".txt")):
        return _read_tsv(path, source_column, target_column)
    raise UserError(f"{path}: parallel data must be .tsv, .jsonl (optionally .gz), or two aligned text files "
                    "(data.path and data.target_path)")


def _read_tsv(path: Path, source_column, target_column) -> list[tuple[str, str]]:
    rows = csv.reader(open_text(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    by_index = isinstance(source_column, int) and isinstance(target_column, int)
    if not by_index:
        header = next(rows, None) or []
        missing = [c for c in (source_column, target_column) if c not in header]
        if missing:
            raise UserError(f"{path}: no column {missing[0]!r} in its header {header[:6]}: set data.source_column / "
                            "data.target_column to its columns (names, or 0-based numbers for a file without header)")
        source_column, target_column = header.index(source_column), header.index(target_column)
    pairs, first = [], 1 if by_index else 2
    need = max(source_column, target_column) + 1
    for line, row in enumerate(rows, start=first):
        if len(row) < need:
            raise UserError(f"{path} line {line}: {len(row)} tab-separated column(s), expected at least {need}: fix that line")
        pairs.append(_check_pair(path, line, row[source_column], row[target_column]))
    return pairs


def json_lines(path: Path):
    """(line number, object) of every non-empty line of a JSONL file; a line that is not JSON is refused with its number."""
    for line, text in enumerate(open_text(path), start=1):
        if not text.strip():
            continue
        try:
            yield line, json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {line}: not valid JSON ({e.msg}): fix that line") from None


def _read_jsonl(path: Path, source_column: str, target_column: str) -> list[tuple[str, str]]:
    pairs = []
    for line, row in json_lines(path):
        if not isinstance(row, dict) or source_column not in row or target_column not in row:
            raise UserError(f"{path} line {line}: needs keys {source_column!r} and {target_column!r} "
                            "(data.source_column / data.target_column)")
        pairs.append(_check_pair(path, line, row[source_column], row[target_column]))
    return pairs


def _read_aligned(source: Path, target: Path) -> list[tuple[str, str]]:
    src = open_text(source).read().splitlines()
    tgt = open_text(target).read().splitlines()
    if len(src) != len(tgt):
        line = min(len(src), len(tgt)) + 1
        raise UserError(f"{source} has {len(src)} lines but {target} has {len(tgt)}: they must be aligned line by line "
                        f"(the first line without a partner is line {line})")
    return [_check_pair(source, i, s, t) for i, (s, t) in enumerate(zip(src, tgt), start=1)]


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size: int, *, eos_at: str = "end"):
    """A byte-level BPE tokenizer trained on `texts`, with <pad>, </s> and <unk>; returned as a transformers
    PreTrainedTokenizerFast whose post-processor adds </s> where `eos_at` says: "end" after the text (translation:
    source and target sentences together, one shared vocabulary as Marian's; a target ends with </s>), or "start"
    before it (a language model: </s> also serves as its beginning-of-text token, as GPT-2's <|endoftext|>, so
    `tokenizer(text)` gives what the model saw before a document)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    eos = SPECIAL_TOKENS["eos"]
    template = {"end": f"$A {eos}", "start": f"{eos} $A"}[eos_at]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(eos, tok.token_to_id(eos))])
    bos = {"bos_token": eos} if eos_at == "start" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL_TOKENS["pad"], eos_token=eos,
                                   unk_token=SPECIAL_TOKENS["unk"], **bos)


# ----------------------------------------------------------------------------- batches
class TokenizedPairs(torch.utils.data.Dataset):
    """Token ids of source and target sentences (each ending in </s>); the decoder starts from `start_id` (Marian,
    BART and T5 start from the pad or a bos token)."""

    def __init__(self, sources: list[list[int]], targets: list[list[int]], pad_id: int, start_id: int, *,
                 source_texts: list[str] | None = None, references: list[str] | None = None):
        if len(sources) != len(targets):
            raise ValueError(f"TokenizedPairs: {len(sources)} sources but {len(targets)} targets")
        self.sources, self.targets, self.pad_id, self.start_id = sources, targets, pad_id, start_id
        self.source_texts, self.references = source_texts, references  # the untokenized text (BLEU, samples)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]):
        src = [self.sources[i] for i in indices]
        tgt = [self.targets[i] for i in indices]
        input_ids, attention_mask = pad_rows(src, self.pad_id)
        decoder_input_ids, decoder_attention_mask = pad_rows([[self.start_id, *t[:-1]] for t in tgt], self.pad_id)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask}
        return inputs, torch.as_tensor([token for t in tgt for token in t], dtype=torch.long)

    def lengths(self) -> np.ndarray:
        """Source plus target tokens per example (batches of similar length pad less: distill.batching)."""
        return np.array([len(s) + len(t) for s, t in zip(self.sources, self.targets)], dtype=np.int64)

    def row_counts(self) -> np.ndarray:
        """Label rows per example: its target tokens (what a teacher cache stores per example)."""
        return np.array([len(t) for t in self.targets], dtype=np.int64)

    def sha256(self) -> str:
        h = hashlib.sha256(f"pairs {len(self)} pad {self.pad_id} start {self.start_id}\n".encode())
        for side in (self.sources, self.targets):
            h.update(np.array([len(r) for r in side], dtype=np.int64).tobytes())
            h.update(np.concatenate([np.asarray(r, dtype=np.int64) for r in side] or [np.zeros(0, np.int64)]).tobytes())
        return h.hexdigest()

    def subset(self, indices) -> "TokenizedPairs":
        indices = [int(i) for i in indices]
        pick = lambda rows: None if rows is None else [rows[i] for i in indices]  # noqa: E731
        return TokenizedPairs(pick(self.sources), pick(self.targets), self.pad_id, self.start_id,
                              source_texts=pick(self.source_texts), references=pick(self.references))

    def labelled(self) -> np.ndarray:
        return np.ones(len(self), dtype=bool)


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int, start_id: int) -> TokenizedPairs:
    """Both sides with the shared tokenizer, cut to max_length tokens (the </s> kept last)."""
    def ids(texts):
        out = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return [r if len(r) <= max_length else [*r[: max_length - 1], r[-1]] for r in out]

    return TokenizedPairs(ids(s for s, _ in pairs), ids(t for _, t in pairs), tokenizer.pad_token_id, start_id,
                          source_texts=[s for s, _ in pairs], references=[t for _, t in pairs])
