"""Tiny transformers models, tokenizers and text data sets built on the spot (no downloads), for the text tests.

Sentiment: a sentence is positive when it holds more positive than negative words. Tags: person and place names
(B-PER/I-PER, B-LOC) among filler words, some names split by the tokenizer into several sub-tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "superb", "lovely", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "boring", "dull", "terrible"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "actor", "and", "very", "quite", "in", "it", "with", "met", "went", "to"]
FIRST = ["john", "mary", "peter", "anna"]
LAST = ["smith", "jones"]
PLACES = ["paris", "rome", "london", "berlin"]
AMBIGUOUS = ["jordan", "florence", "austin", "georgia"]
SUFFIXES = ["##s", "##ing", "##ly", "##er"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocab() -> list[str]:
    # sub-words only for "play##ing"-style splits: "playing" is in the data, "play" + "##ing" in the vocabulary
    return SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER + FIRST + LAST + PLACES + AMBIGUOUS + ["play", "walk"])) + SUFFIXES


def make_tokenizer(folder: Path, words: list[str] | None = None):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    words = words or vocab()
    core = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = words.index("[CLS]"), words.index("[SEP]")
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok = BertTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(folder)
    return tok


def make_bert(folder: Path, *, token_level: bool | None = None, num_labels: int = 2, layers: int = 2, hidden: int = 32,
              heads: int = 2, seed: int = 0, tokenizer_words: list[str] | None = None, dropout: float = 0.1) -> Path:
    """A randomly initialised BERT with its tokenizer, in `folder`: a base model (token_level None, like a pretrained
    encoder; a task head is added when it is loaded), or a classifier with a head for num_labels labels."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, BertModel

    torch.manual_seed(seed)
    tok = make_tokenizer(folder, tokenizer_words)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    head = {None: BertModel, True: BertForTokenClassification, False: BertForSequenceClassification}[token_level]
    head(config).save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos, neg = rng.randint(0, 3), rng.randint(0, 3)
        while pos == neg:
            pos, neg = rng.randint(0, 3), rng.randint(0, 3)
        words = [rng.choice(POSITIVE) for _ in range(pos)] + [rng.choice(NEGATIVE) for _ in range(neg)]
        words += [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if pos > neg else "neg"})
    return rows


def write_sentiment(path: Path, n: int = 300, seed: int = 0) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in sentiment_rows(n, seed)) + "\n")
    return path


def tagged_sentences(n: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """Persons (one or two words) and places, and AMBIGUOUS words that are a person after "met" and a place after
    "to" or "in": a tagger must read the context, so scores are graded rather than all-or-nothing."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentence = [(rng.choice(FILLER[:8]), "O") for _ in range(rng.randint(1, 3))]
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["per", "loc", "amb-per", "amb-loc", "none"])
            if kind == "per":
                sentence += [("met", "O"), (rng.choice(FIRST), "B-PER")] + ([(rng.choice(LAST), "I-PER")] if rng.random() < 0.5 else [])
            elif kind == "loc":
                sentence += [(rng.choice(["to", "in"]), "O"), (rng.choice(PLACES), "B-LOC")]
            elif kind == "amb-per":
                sentence += [("met", "O"), (rng.choice(AMBIGUOUS), "B-PER")]
            elif kind == "amb-loc":
                sentence += [(rng.choice(["to", "in"]), "O"), (rng.choice(AMBIGUOUS), "B-LOC")]
            else:
                sentence += [(w, "O") for w in rng.sample(["went", "playing", "walks", "very", "quite"], 2)]
        out.append(sentence)
    return out


def write_conll(folder: Path, sizes=(300, 60, 200), seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for part, n, offset in zip(("train", "valid", "test"), sizes, (0, 1, 2)):
        lines = []
        for sentence in tagged_sentences(n, seed * 10 + offset):
            lines += [f"{w}\t{t}" for w, t in sentence] + [""]
        (folder / f"{part}.conll").write_text("\n".join(lines))
    return folder
