"""A small synthetic translation task that a tiny seq2seq model learns in seconds: English "the ADJ NOUN is ADJ"
into Spanish word by word, with the adjective moved after its noun (reordering), e.g. "the good film is long" ->
"el película bueno es largo"."""

import random
from pathlib import Path

import yaml

NOUNS = {"film": "película", "actor": "actor", "music": "música", "story": "historia", "ending": "final",
         "director": "director"}
ADJECTIVES = {"good": "bueno", "bad": "malo", "long": "largo", "short": "corto", "funny": "divertido", "sad": "triste"}
DETERMINERS = {"the": "el", "a": "un"}


def sentence_pair(rng: random.Random) -> tuple[str, str]:
    det, adj, noun, adj2 = (rng.choice(sorted(d)) for d in (DETERMINERS, ADJECTIVES, NOUNS, ADJECTIVES))
    return (f"{det} {adj} {noun} is {adj2}",
            f"{DETERMINERS[det]} {NOUNS[noun]} {ADJECTIVES[adj]} es {ADJECTIVES[adj2]}")


def write_parallel(folder: Path, sizes=(320, 40, 40), seed: int = 0) -> Path:
    """train.tsv / valid.tsv / test.tsv with a `source` and a `target` column."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in zip(("train", "valid", "test"), sizes):
        rows = [sentence_pair(rng) for _ in range(n)]
        (folder / f"{name}.tsv").write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in rows))
    return folder


def translation_recipe(tmp_path: Path, **sections) -> dict:
    raw = {
        "name": "tr", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "parallel", "path": str(write_parallel(tmp_path / "pairs")), "max_length": 16, "vocab_size": 320},
        "teacher": {"model": {"kind": "seq2seq", "encoder_layers": 2, "decoder_layers": 2, "d_model": 64, "heads": 4,
                              "ffn_dim": 128, "dropout": 0.0},
                    "train": {"epochs": 60, "batch_size": 32, "lr": 0.003}},
        "student": {"model": {"kind": "seq2seq", "encoder_layers": 1, "decoder_layers": 1, "d_model": 32, "heads": 2,
                              "ffn_dim": 64, "dropout": 0.0},
                    "train": {"epochs": 40, "batch_size": 32, "lr": 0.003}},
        "distill": {"method": "kd", "temperature": 1, "hard_weight": 0.5, "soft_weight": 0.5},
        "report": {"repeats": 2, "throughput_batch": 4},
    }
    raw.update(sections)
    return raw


def write_recipe(tmp_path: Path, raw: dict, name: str = "tr.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)
