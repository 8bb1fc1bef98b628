"""A tiny synthetic language for the causal-LM tests ("the film was good and the actor was dull ."), a BPE tokenizer
trained on it (optionally with a small chat template), and a recipe whose models are built from configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

ADJECTIVES = ["good", "bad", "long", "short", "funny", "sad", "great", "dull"]
NOUNS = ["film", "movie", "story", "actor", "ending", "plot"]
# every turn as <|role|>content</s>; the generation prompt opens the assistant's turn
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def sentence(rng: random.Random) -> str:
    n1, a1, n2, a2 = rng.choice(NOUNS), rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(ADJECTIVES)
    return f"the {n1} was {a1} and the {n2} was {a2} ."


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def write_docs(path: Path, n: int = 240, seed: int = 0) -> Path:
    path.write_text("".join(f"{d}\n" for d in documents(n, seed)))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(f"{json.dumps(r)}\n" for r in rows))
    return path


def make_tokenizer(folder: Path | None = None, *, chat: bool = False, texts: list[str] | None = None):
    """A byte-level BPE of at most 300 tokens trained on the tiny language (</s> first, as distill trains one for a
    language model); saved in `folder` when given."""
    from distill.data.parallel import train_tokenizer

    tok = train_tokenizer(texts or documents(200), 300, eos_at="start")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    if folder is not None:
        tok.save_pretrained(folder)
    return tok


def lm_recipe(tmp_path: Path, **sections) -> dict:
    raw = {
        "name": "lm", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "lm", "path": str(write_docs(tmp_path / "docs.txt")), "max_length": 24, "vocab_size": 300},
        "teacher": {"model": {"kind": "causal-lm", "arch": "gpt2", "layers": 2, "d_model": 32, "heads": 2, "ffn_dim": 64,
                              "max_positions": 32, "dropout": 0.0},
                    "train": {"epochs": 4, "batch_size": 16, "lr": 0.005}},
        "student": {"model": {"kind": "causal-lm", "arch": "llama", "layers": 1, "d_model": 16, "heads": 2, "ffn_dim": 32,
                              "max_positions": 32, "dropout": 0.0},
                    "train": {"epochs": 3, "batch_size": 16, "lr": 0.005}},
        "distill": {"method": "kd", "temperature": 1, "hard_weight": 0.5, "soft_weight": 0.5},
        "report": {"repeats": 1, "throughput_batch": 2},
    }
    raw.update(sections)
    return raw
