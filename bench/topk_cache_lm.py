"""Top-k teacher cache on a 32,000-word language model: how small, and how close to full-logit KD.

    OMP_NUM_THREADS=2 python bench/topk_cache_lm.py --threads 2

Checks the cache target of distill: "top-k cache (k=32, V=32k) >= 100x smaller than fp32 full logits, with
distilled quality within 0.3 points of full-logit KD on the same task".

Task: next-word prediction on the English side of the English->Spanish corpus (<data-dir>/en-es/*.tsv.gz:
review id, English, Spanish). Words are the lower-cased regex tokens [a-z0-9]+('[a-z]+)?; the vocabulary is the
31,999 most frequent words of train plus <unk> (V = 32,000 output classes). An example is the previous 3 word
ids (padded with <s>, an input-only id V, at sentence start) -> the next word id. The training examples are a
fixed random subsample of train (--examples), validation a subsample of valid (best epoch kept), test is every
position of test.tsv.gz.

Models (Bengio et al. 2003 n-gram MLP, no direct connections): embed each context word, concatenate, one ReLU
hidden layer, a full V-way output layer. The teacher is trained here on the same training examples.
Rows, all from the same student initial weights and the same batches (seed):
  (1) the student alone (cross-entropy to the next word),
  (2) KD from the live teacher's full logits (distill.methods.kd.KD with distill.signals.LiveTeacher),
  (3) the same KD from a top-k cache (write_cache(..., top_k=k, dtype="float16"), CachedDataset +
      CachedTeacher): the k stored logits in a row of -inf, i.e. the teacher's distribution renormalised on its
      top k.
Reported: test top-1 accuracy and perplexity (<unk> counts as a word), the cache's bytes against a full fp32
logit cache (rows x V x 4 bytes, computed, not written), the cache write time and its split, epoch seconds.

Everything is kept in <work-dir>/<hash of the settings>/: the teacher, the cache and one JSON per finished row,
reused when the bench is run again with the same settings (so `--temperatures 1 2` after a run at T = 1 trains
only the T = 2 rows). Timings of reused parts are those of the run that made them (same --threads: part of the
hash). Writes the markdown to --out (bench/results/topk_cache_lm.md; with --quick, into the work dir).
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.checkpoint import (
    atomic_write_text,
    load_model_file,
    load_weights,
    save_model,
)
from distill.data.arrays import ArrayDataset
from distill.errors import UserError
from distill.methods.kd import KD, KDConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.methods.topk import TopK, TopKConfig
from distill.recipe import TrainConfig
from distill.signals import (
    CachedDataset,
    CachedTeacher,
    LiveTeacher,
    open_cache,
    write_cache,
)
from distill.train import fit

REPO = Path(__file__).resolve().parents[1]
TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
VOCAB, CONTEXT, TOP_K = 32_000, 3, 32
TEACHER = {"emb": 128, "hidden": 256, "dropout": 0.0}
STUDENT = {"emb": 64, "hidden": 96, "dropout": 0.0}
TARGET_RATIO, TARGET_POINTS = 100.0, 0.3
ALONE = "(1) student alone"
FULL = {"examples": 80_000, "val_examples": 10_000, "test_examples": None, "epochs": 2, "teacher_epochs": 2}
QUICK = {"examples": 3_000, "val_examples": 1_000, "test_examples": 2_000, "epochs": 1, "teacher_epochs": 1}


# ----------------------------------------------------------------------------- data


def read_sentences(path: Path) -> list[list[str]]:
    """The English column of a corpus file, each sentence as its lower-cased word tokens."""
    if not path.is_file():
        raise UserError(f"{path} not found: pass --data-dir, the folder that holds en-es/")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 2:
                out.append(TOKEN.findall(fields[1].lower()))
    return out


def build_vocab(sentences: list[list[str]], size: int) -> list[str]:
    """The size-1 most frequent words (ties broken alphabetically, so the vocabulary is reproducible), then <unk>."""
    counts = Counter(w for s in sentences for w in s)
    words = sorted(counts, key=lambda w: (-counts[w], w))[: size - 1]
    return [*words, "<unk>"]


def make_examples(sentences: list[list[str]], vocab: list[str], context: int) -> tuple[np.ndarray, np.ndarray]:
    """Every word position: x = the previous `context` ids (<s> = len(vocab) before the sentence), y = its id."""
    index = {w: i for i, w in enumerate(vocab)}
    unk, bos = index["<unk>"], len(vocab)
    xs, ys = [], []
    for s in sentences:
        if not s:
            continue
        ids = np.array([bos] * context + [index.get(w, unk) for w in s], dtype=np.int64)
        windows = np.lib.stride_tricks.sliding_window_view(ids, context + 1)
        xs.append(windows[:, :context])
        ys.append(windows[:, context])
    return np.concatenate(xs), np.concatenate(ys)


def subsample(x: np.ndarray, y: np.ndarray, n: int | None, seed: int, what: str) -> ArrayDataset:
    """A fixed random subset of n rows (in corpus order), or all rows when n is None."""
    if n is not None:
        if n > len(y):
            raise UserError(f"--{what} {n} is more than the {len(y):,} examples available: pass a smaller number")
        keep = np.sort(np.random.default_rng(seed).choice(len(y), size=n, replace=False))
        x, y = x[keep], y[keep]
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))


def load_task(data_dir: Path, sizes: dict) -> dict:
    folder = data_dir / "en-es"
    train_sents = read_sentences(folder / "train.tsv.gz")
    vocab = build_vocab(train_sents, VOCAB)
    splits = {}
    for name, sents, n, seed in (("train", train_sents, sizes["examples"], 1),
                                 ("val", read_sentences(folder / "valid.tsv.gz"), sizes["val_examples"], 2),
                                 ("test", read_sentences(folder / "test.tsv.gz"), sizes["test_examples"], 3)):
        x, y = make_examples(sents, vocab, CONTEXT)
        splits[name] = subsample(x, y, n, seed, {"train": "examples", "val": "val-examples", "test": "test-examples"}[name])
        splits[f"{name}_available"] = len(y)
    splits["vocab"] = vocab
    return splits


# ----------------------------------------------------------------------------- models


class WordMLP(nn.Module):
    """n-gram neural language model (Bengio et al. 2003, without the direct input-output connections):
    logits = W2 · dropout(relu(W1 · [e(w_1); ...; e(w_n)] + b1)) + b2 over a vocabulary of `vocab` words.
    The embedding has one more row than the vocabulary: the sentence-start id `vocab`, never predicted."""

    def __init__(self, vocab: int, context: int, emb: int, hidden: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab + 1, emb)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(context * emb, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.embed(x)))


def build(spec: dict) -> WordMLP:
    return WordMLP(VOCAB, CONTEXT, spec["emb"], spec["hidden"], spec["dropout"])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the bench


@torch.inference_mode()
def test_metrics(model: nn.Module, test: ArrayDataset, batch_size: int = 2048) -> tuple[dict, np.ndarray]:
    """Top-1 accuracy (%), perplexity = exp(mean cross-entropy), and whether each test row was right (for paired
    comparisons between rows)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, []
    for start in range(0, len(test.y), batch_size):
        x, y = test.x[start:start + batch_size], test.y[start:start + batch_size]
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct.append((logits.argmax(-1) == y).numpy())
    model.train(was_training)
    right, loss = np.concatenate(correct), loss_sum / len(test.y)
    return {"accuracy": 100 * float(right.mean()), "perplexity": math.exp(loss), "loss": loss, "n": len(right)}, right


def fit_record(model: nn.Module, result, test, correct_path: Path) -> dict:
    """What a trained row reports; its per-row test correctness goes to `correct_path` (.npy)."""
    seconds = [h["seconds"] for h in result.history]
    metrics, right = test_metrics(model, test)
    np.save(correct_path, right)
    return {"test": metrics, "epochs": len(seconds), "best_epoch": result.best_epoch,
            "epoch_seconds": seconds, "median_epoch_seconds": statistics.median(seconds),
            "val_accuracy": [100 * h["val_accuracy"] for h in result.history]}


def paired_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Accuracy of a minus accuracy of b on the same test rows, in points, with its standard error from test
    sampling alone: d_i = a_i − b_i in {−1, 0, 1}, SE = std(d) / sqrt(n) (training noise is not in it)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return 100 * float(d.mean()), 100 * float(d.std(ddof=1) / math.sqrt(len(d)))


class Bench:
    """The data, the settings and the work folder of one bench; trains or reuses the teacher, cache and rows."""

    def __init__(self, args, data: dict, settings: dict):
        self.args, self.data, self.settings = args, data, settings
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.work = Path(args.work_dir) / (("quick-" if args.quick else "") + digest)
        (self.work / "runs").mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.work / "settings.json", json.dumps(settings, indent=1) + "\n")
        s = settings
        self.teacher_train = TrainConfig(epochs=s["teacher_epochs"], batch_size=s["batch_size"], lr=s["teacher_lr"])
        self.student_train = TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"])
        self.teacher_info: dict = {}
        self.reused = False  # whether any part (teacher, cache, row) comes from an earlier run
        self.load_start = args.load_start  # other jobs on the machine slow every timing here

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def teacher(self) -> WordMLP:
        """<work>/teacher.safetensors, trained now (seed 0) if absent."""
        path = self.work / "teacher.safetensors"
        if path.exists():
            model = build(TEACHER)
            state, info = load_model_file(path)
            load_weights(model, state, str(path))
            self.log(f"teacher reused from {path}")
            self.reused = True
        else:
            self.log(f"training the teacher ({self.teacher_train.epochs} epochs) ...")
            torch.manual_seed(0)
            model = build(TEACHER)
            result = fit(model, Supervised(SupervisedConfig()), self.data["train"], self.data["val"],
                         self.teacher_train, seed=0, progress=False)
            info = fit_record(model, result, self.data["test"], self.work / "teacher.correct.npy")
            save_model(path, model, info)
        self.teacher_info = info
        self.log(f"teacher: test accuracy {info['test']['accuracy']:.2f}%, perplexity {info['test']['perplexity']:.1f}")
        return model.eval()

    def cache(self, teacher: WordMLP) -> tuple[Path, dict]:
        """The top-k cache of the teacher over the training examples, and the stats of the write that made it."""
        folder, stats_path = self.work / f"cache-top{TOP_K}", self.work / f"cache-top{TOP_K}.json"
        fresh = not folder.exists()
        manifest = write_cache(teacher, self.data["train"], folder, top_k=TOP_K, dtype="float16")
        if fresh or not stats_path.exists():
            atomic_write_text(stats_path, json.dumps(manifest["stats"], indent=1) + "\n")
        stats = json.loads(stats_path.read_text())
        self.reused |= not fresh
        self.log(f"cache {folder}: {stats['bytes'] / 1e6:.2f} MB, written in {stats['total_seconds']:.1f} s"
                 + ("" if fresh else " (earlier run; reused now)"))
        return folder, stats

    def correct_path(self, name: str) -> Path:
        return self.work / "runs" / f"{name}.correct.npy"

    def correct(self, name: str) -> np.ndarray:
        return np.load(self.correct_path(name), allow_pickle=False)

    def student(self, name: str, method, train_data) -> dict:
        """Row `name`: the student from torch.manual_seed(seed) trained with `method`; stored as JSON, reused."""
        path = self.work / "runs" / f"{name}.json"
        if path.exists():
            record = json.loads(path.read_text())
            self.log(f"{name}: reused from {path}")
            self.reused = True
        else:
            self.log(f"{name}: training ({self.student_train.epochs} epochs) ...")
            torch.manual_seed(self.settings["seed"])  # every row starts from the same weights
            model = build(STUDENT)
            result = fit(model, method, train_data, self.data["val"], self.student_train,
                         seed=self.settings["seed"], progress=False)
            record = fit_record(model, result, self.data["test"], self.correct_path(name))
            atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        record["name"] = name
        t = record["test"]
        self.log(f"{name}: test accuracy {t['accuracy']:.2f}%, perplexity {t['perplexity']:.1f}, "
                 f"{record['median_epoch_seconds']:.1f} s/epoch")
        return record


def topk_mass(cache_dir: Path) -> float:
    """Mean over cached rows of the teacher's probability (T = 1) on its top k words: Σ_top-k exp(t_c − logsumexp t)."""
    cache = open_cache(cache_dir, verify="lazy")
    idx = np.arange(cache.n_rows)
    total = 0.0
    for start in range(0, len(idx), 65536):
        values, _, lse = cache.topk(idx[start:start + 65536])
        total += torch.exp(values - lse[:, None]).sum(1).double().sum().item()
    return total / cache.n_rows


@torch.inference_mode()
def topk_mass_live(teacher: nn.Module, x: torch.Tensor, temperature: float, rows: int = 20_000) -> float:
    """The same mean top-k mass as topk_mass, of softmax(t / T), from the live teacher on the first `rows` rows
    (a cache stores the top k of t and logsumexp t at T = 1 only)."""
    teacher.eval()
    total = 0.0
    for start in range(0, min(rows, len(x)), 2048):
        p = torch.softmax(teacher(x[start:start + 2048]).float() / temperature, dim=-1)
        total += p.topk(TOP_K, dim=-1).values.sum(1).double().sum().item()
    return total / min(rows, len(x))


def kd_config(args, temperature: float) -> KDConfig:
    return KDConfig(temperature=temperature, hard_weight=args.hard_weight, soft_weight=args.soft_weight)


def topk_config(args) -> TopKConfig:
    return TopKConfig(k=TOP_K, rest="bucket", temperature=1.0, hard_weight=args.hard_weight, soft_weight=args.soft_weight)


def first_run(bench: "Bench", elapsed: float) -> dict | None:
    """When, how long and under what machine load the first run with these settings (the one that measured
    everything) ran: recorded by a run that reused nothing, read back by later runs (None if not recorded)."""
    path = bench.work / "first-run.json"
    if not bench.reused:
        record = {"finished_utc": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}", "wall_seconds": elapsed,
                  "load_start": bench.load_start, "load_end": os.getloadavg()[0]}
        atomic_write_text(path, json.dumps(record) + "\n")
        return record
    return json.loads(path.read_text()) if path.exists() else None


def wall_clock(bench: "Bench", elapsed: float, first: dict | None) -> str:
    if not bench.reused:
        return f"Whole bench: {elapsed / 60:.1f} min wall clock."
    return (f"This run: {elapsed / 60:.1f} min wall clock, the rows above reused from an earlier run with the same "
            "settings" + (f" (which took {first['wall_seconds'] / 60:.1f} min)." if first else "."))


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def report(bench: Bench, rows: dict, pairs: dict, bucket: str | None, cache_stats: dict, masses: dict, command: str,
           elapsed: float) -> str:
    a, d, s = bench.args, bench.data, bench.settings
    n_rows = len(d["train"])
    full_bytes = n_rows * VOCAB * 4
    ratio = full_bytes / cache_stats["bytes"]
    first = first_run(bench, elapsed)
    when = (f"Measured {first['finished_utc']} UTC; 1-minute load average {first['load_start']:.1f} at the start, "
            f"{first['load_end']:.1f} at the end" if first else "Measured by an earlier run")
    lines = [
        f"# Top-{TOP_K} teacher cache vs full-logit KD: next-word prediction, V = {VOCAB:,}",
        "",
        f"`{command}`",
        "",
        (f"{when}; {os.cpu_count()} cores ({platform.machine()}, shared with other jobs: timings are indicative), "
         f"torch {torch.__version__}, {torch.get_num_threads()} threads."),
        "",
    ]
    if a.quick:
        lines += ["**Smoke run (--quick): tiny data, not a result.**", ""]
    lines += [
        "| row | test accuracy (%) | test perplexity | vs (1) alone (points) | vs (2) full-logit KD (points) | s/epoch |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    t = bench.teacher_info["test"]
    lines.append(f"| teacher | {t['accuracy']:.2f} | {t['perplexity']:.1f} | | | "
                 f"{bench.teacher_info['median_epoch_seconds']:.1f} |")
    alone = rows[ALONE]["test"]["accuracy"]
    gaps = {T: paired_gap(bench.correct(rows[cached]["name"]), bench.correct(rows[live]["name"]))
            for T, (live, cached) in pairs.items()}
    vs_full = {cached: gaps[T] for T, (_, cached) in pairs.items()}  # each row vs full-logit KD at its T
    if bucket:
        vs_full[bucket] = paired_gap(bench.correct(rows[bucket]["name"]), bench.correct(rows[pairs[1.0][0]]["name"]))
    for name, r in rows.items():
        acc = r["test"]["accuracy"]
        vs_alone = "" if name == ALONE else f"{acc - alone:+.2f}"
        vs_kd = f"{vs_full[name][0]:+.2f} ± {vs_full[name][1]:.2f}" if name in vs_full else ""
        lines.append(f"| {name} | {acc:.2f} | {r['test']['perplexity']:.1f} | {vs_alone} | {vs_kd} | "
                     f"{r['median_epoch_seconds']:.1f} |")
    lines += [
        "",
        (f"Test: {len(d['test']):,} next-word predictions. ± is the standard error of the paired difference from "
         "test sampling alone (same test rows; not the spread over training seeds, which one seed cannot show). "
         "s/epoch: median training seconds per epoch — teacher forward (2) or cache reads (3) included, validation "
         f"excluded. {wall_clock(bench, elapsed, first)}"),
    ]
    cs = cache_stats
    total = max(cs["total_seconds"], 1e-9)
    other = total - cs["teacher_seconds"] - cs["io_seconds"] - cs["hash_seconds"]
    per_row = cs["bytes"] / n_rows
    lines += [
        "",
        "## Cache size and write time",
        "",
        "| | bytes | per row |",
        "|:---|---:|---:|",
        (f"| top-{TOP_K} cache as written (float16 values, int16 word ids, float32 logsumexp, .npy headers, "
        f"manifest excluded) | {cs['bytes']:,} ({fmt_bytes(cs['bytes'])}) | {per_row:.1f} |"),
        (f"| full fp32 logits (rows × V × 4, computed, not written) | {full_bytes:,} ({fmt_bytes(full_bytes)}) | "
        f"{VOCAB * 4:,} |"),
        f"| **ratio** | **{ratio:.0f}x** | |",
        "",
        f"Cache write over {n_rows:,} rows: {cs['total_seconds']:.1f} s = teacher forward (with top-k) "
        f"{cs['teacher_seconds']:.1f} s ({100 * cs['teacher_seconds'] / total:.0f}%) + I/O (memmap writes, "
        f"sha256, manifest) {cs['io_seconds']:.1f} s ({100 * cs['io_seconds'] / total:.0f}%) + hashing teacher and "
        f"data {cs['hash_seconds']:.1f} s ({100 * cs['hash_seconds'] / total:.0f}%) + other {max(other, 0):.1f} s. "
        f"The teacher puts {100 * masses[1.0]:.1f}% of its probability (T = 1) on its top {TOP_K} words, averaged "
        "over the cached rows: the rest is what the renormalised top-k target drops"
        + "".join(f"; at T = {T:g}, {100 * m:.1f}% (live teacher, first {min(20_000, n_rows):,} rows)"
                  for T, m in masses.items() if T != 1.0) + ".",
        "",
        "## Verdict",
        "",
        (f"- Size: top-{TOP_K} cache {ratio:.0f}x smaller than fp32 full logits — target >= {TARGET_RATIO:.0f}x: "
        f"**{'MET' if ratio >= TARGET_RATIO else 'NOT MET'}**."),
    ]
    alone_ppl = rows[ALONE]["test"]["perplexity"]
    for T, (gap, se) in gaps.items():
        ok = abs(gap) <= TARGET_POINTS
        lines.append(f"- Quality at T = {T:g}: |acc(3) − acc(2)| = {abs(gap):.2f} points (top-k "
                     f"{'better' if gap > 0 else 'worse' if gap < 0 else 'equal'}; ± {se:.2f} from test sampling) — "
                     f"target <= {TARGET_POINTS} points: **{'MET' if ok else 'NOT MET'}**.")
        live, cached = (rows[name] for name in pairs[T])
        ppl2, ppl3 = live["test"]["perplexity"], cached["test"]["perplexity"]
        why = ""
        if ppl3 > 1.1 * ppl2:  # the renormalised target gives the words outside the teacher's top k no mass
            why = (f" The renormalised top-{TOP_K} target gives every word outside the teacher's top {TOP_K} "
                   f"(which hold {100 * masses.get(T, masses[1.0]):.0f}% of its probability"
                   f"{'' if T in masses else ' at T = 1'}) zero probability, so the student learns to give them "
                   "almost none: top-1 accuracy does not see that, perplexity does.")
        lines.append(f"- Perplexity at T = {T:g} (not part of the target): (3) {ppl3:.1f} vs (2) {ppl2:.1f} "
                     f"({ppl3 / ppl2:.2f}x; the student alone {alone_ppl:.1f}).{why}")
        e1, e2, e3 = (r["median_epoch_seconds"] for r in (rows[ALONE], live, cached))
        lines.append(f"- Epoch time at T = {T:g}: (3) {e3:.1f} s vs (2) {e2:.1f} s ({e3 / e2:.2f}x); the student "
                     f"alone {e1:.1f} s. The cache saves the teacher forward (the whole cache write took "
                     f"{cache_stats['total_seconds']:.0f} s); the {VOCAB:,}-way soft-target loss, computed in both, "
                     f"is most of the rest ({e3 - e1:.0f} s of (3)'s epoch beyond the student alone).")
    if bucket:
        b, full = rows[bucket]["test"], rows[pairs[1.0][0]]["test"]
        lines.append(f"- Rest bucket (4), from the same top-{TOP_K} cache at T = 1: accuracy {b['accuracy']:.2f}% "
                     f"({vs_full[bucket][0]:+.2f} ± {vs_full[bucket][1]:.2f} points vs (2)), perplexity "
                     f"{b['perplexity']:.1f} vs (2) {full['perplexity']:.1f}: keeping the teacher's mass outside its "
                     f"top {TOP_K} as one bucket (from the cached logsumexp) keeps the calibration the renormalised "
                     "target loses" + ("." if b["perplexity"] <= 1.1 * full["perplexity"] else
                                       " only in part."))
    tp, sp = n_params(build(TEACHER)), n_params(build(STUDENT))
    lines += [
        "",
        "## Setup",
        "",
        (f"Data: English side of {a.data_dir}/en-es; words = lower-cased `{TOKEN.pattern}` tokens; vocabulary = "
         f"the {VOCAB - 1:,} most frequent train words + <unk> (every other word is <unk>, which counts as a word "
         f"in accuracy and perplexity). Example = previous {CONTEXT} words (<s>-padded) -> next word. Training: "
         f"{n_rows:,} examples drawn at random from {d['train_available']:,}; validation (best epoch kept): "
         f"{len(d['val']):,} of {d['val_available']:,}; test: {len(d['test']):,} of {d['test_available']:,} "
         f"(<unk> is {100 * float((d['test'].y == VOCAB - 1).float().mean()):.1f}% of test targets)."),
        "",
        (f"Teacher: embedding {TEACHER['emb']} per word, hidden {TEACHER['hidden']} ReLU, dropout "
         f"{TEACHER['dropout']}, output {VOCAB:,} ({tp / 1e6:.2f}M parameters), {s['teacher_epochs']} epochs. "
         f"Student: embedding {STUDENT['emb']}, hidden {STUDENT['hidden']}, output {VOCAB:,} ({sp / 1e6:.2f}M "
         f"parameters), {s['epochs']} epochs. Adam (teacher lr {s['teacher_lr']:g}, students {s['lr']:g}; chosen on "
         f"validation for the teacher and the student alone), batch {s['batch_size']}, cosine schedule. Every "
         f"student row starts from the same weights (seed {s['seed']}) and sees the same batches. The sizes aim at "
         "about 15 minutes at 2 threads on an otherwise idle machine: every KD epoch computes a "
         f"{VOCAB:,}-way soft-target loss for every row, several times the student's own step."),
        "",
        (f"KD rows: distill.methods.kd.KD, {a.hard_weight:g}·CE(labels) + {a.soft_weight:g}·T²·KL(teacher/T ‖ "
         f"student/T). (2) asks the live teacher (LiveTeacher) for full logits every batch; (3) reads the top-{TOP_K} "
         f"cache (CachedDataset + CachedTeacher): the {TOP_K} stored logits in a row of −inf, so the soft target is "
         f"the teacher's distribution renormalised on its top {TOP_K} words (at T ≠ 1 the top {TOP_K} of t/T, "
         "renormalised)."
         + (f" (4): distill.methods.topk.TopK, k = {TOP_K}, rest: bucket, T = 1, the same weights: the soft target "
            f"is the teacher's top {TOP_K} probabilities plus one bucket holding the rest of its mass, exp(t − "
            "logsumexp) from the cache's stored logsumexp; the student's bucket is its own mass outside those words."
            if bucket else "")),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder holding en-es/")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--examples", type=int, default=None, help=f"training examples (default {FULL['examples']:,})")
    p.add_argument("--val-examples", type=int, default=None, help=f"validation examples (default {FULL['val_examples']:,})")
    p.add_argument("--test-examples", type=int, default=None, help="test examples (default all)")
    p.add_argument("--epochs", type=int, default=None, help=f"student epochs (default {FULL['epochs']})")
    p.add_argument("--teacher-epochs", type=int, default=None, help=f"teacher epochs (default {FULL['teacher_epochs']})")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-2, help="students' Adam learning rate")
    p.add_argument("--teacher-lr", type=float, default=5e-3)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0], help="KD temperature(s): rows (2), (3) per T")
    p.add_argument("--hard-weight", type=float, default=0.1)
    p.add_argument("--soft-weight", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="the students' initial weights and batch order")
    p.add_argument("--work-dir", default="/work/bench-runs/topk-lm", help="teacher, cache and finished rows, reused")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data, 1 epoch each")
    p.add_argument("--out", default=None, help="markdown output (default bench/results/topk_cache_lm.md; "
                                               "with --quick, <work-dir>/quick.md)")
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    t_start, args.load_start = time.perf_counter(), os.getloadavg()[0]
    try:
        sizes = {k: (getattr(args, k) if getattr(args, k) is not None else (QUICK if args.quick else FULL)[k])
                 for k in FULL}
        for flag in ("examples", "val_examples", "test_examples", "epochs", "teacher_epochs"):
            if sizes[flag] is not None and sizes[flag] < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
        if args.threads < 1 or args.batch_size < 1:
            raise UserError("--threads and --batch-size must be at least 1")
        if args.lr <= 0 or args.teacher_lr <= 0:
            raise UserError("--lr and --teacher-lr must be > 0")
        if args.hard_weight < 0 or args.soft_weight <= 0:
            raise UserError("--hard-weight must be >= 0 and --soft-weight > 0 (the soft term is what is compared)")
        if any(t <= 0 for t in args.temperatures):
            raise UserError(f"--temperatures must all be > 0, got {args.temperatures}")
        torch.set_num_threads(args.threads)
        data = load_task(Path(args.data_dir), sizes)
        settings = {**sizes, "batch_size": args.batch_size, "lr": args.lr, "teacher_lr": args.teacher_lr,
                    "seed": args.seed, "threads": args.threads, "hard_weight": args.hard_weight,
                    "soft_weight": args.soft_weight, "teacher": TEACHER, "student": STUDENT, "vocab": VOCAB,
                    "context": CONTEXT, "top_k": TOP_K}
        bench = Bench(args, data, settings)
        bench.log(f"data: {len(data['train']):,} training, {len(data['val']):,} validation, {len(data['test']):,} "
                  f"test examples; work dir {bench.work}")

        teacher = bench.teacher()
        cache_dir, cache_stats = bench.cache(teacher)
        cached_train = CachedDataset(data["train"], open_cache(cache_dir, teacher=teacher, dataset=data["train"]))
        rows = {ALONE: bench.student("alone", Supervised(SupervisedConfig()), data["train"])}
        pairs = {}  # T -> the labels of its rows (2) and (3)
        for T in args.temperatures:
            pairs[T] = (f"(2) KD, live teacher, full logits, T = {T:g}", f"(3) KD, top-{TOP_K} cache, T = {T:g}")
            rows[pairs[T][0]] = bench.student(
                f"kd-live-T{T:g}", KD(kd_config(args, T), teacher=LiveTeacher(teacher)), data["train"])
            rows[pairs[T][1]] = bench.student(
                f"kd-top{TOP_K}-T{T:g}", KD(kd_config(args, T), teacher=CachedTeacher()), cached_train)
        bucket = None
        if 1.0 in pairs:  # the rest bucket is exact from a top-k cache at T = 1 only (its logsumexp is of t, not t/T)
            bucket = f"(4) top-{TOP_K} KD, rest bucket, top-{TOP_K} cache, T = 1"
            rows[bucket] = bench.student(f"topk{TOP_K}-bucket-T1", TopK(topk_config(args), teacher=CachedTeacher()),
                                         cached_train)
        masses = {1.0: topk_mass(cache_dir)}
        masses.update({T: topk_mass_live(teacher, data["train"].x, T) for T in args.temperatures if T != 1.0})
        text = report(bench, rows, pairs, bucket, cache_stats, masses, command, time.perf_counter() - t_start)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (bench.work.parent / "quick.md" if args.quick
                                           else REPO / "bench" / "results" / "topk_cache_lm.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    bench.log(f"written to {out}; bench took {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
