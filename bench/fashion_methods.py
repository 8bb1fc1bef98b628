"""Every distillation method of distill on Fashion-MNIST: one CNN teacher, one MLP student, the same start per seed.

    python bench/fashion_methods.py --data-dir /work/shared/data --seeds 0 1 2 --threads 2

The teacher (and, for the "ensemble" row, two more teachers with other seeds) is trained once and saved in
<work-dir>; later runs reuse it. For every seed and method the student is built right after
torch.manual_seed(seed), so all methods of a seed start from the scratch student's initial weights and see the
same batches. Each finished (method, seed) run is a JSON file in <work-dir>/runs/ and is skipped when the bench
is run again, so an interrupted bench resumes and new methods or seeds extend it (--methods picks a subset).
A stored run or teacher made with other settings is refused, not silently mixed in. Prints a markdown table
and writes it to --out.

Budget: the defaults (3 seeds, 8 student and 15 teacher epochs) take about 40 minutes on 2 cores, estimated from
the parts: per seed and epoch ~85 s for all rows (BSS ~18 s, the ensemble and Sobolev ~10 s each, KD ~3.7 s, the MLP
alone 0.6 s), plus ~6 minutes for the three teachers. --limit-train 3000 --seeds 0 --threads 1 is a smoke test
of every row in a few minutes.

Adding a row: one Entry in METHODS (a method config, who teaches, which student, the rows its deltas are taken
against). A teacher other than the CNN (a teacher-assistant, specialists) is a named function of the Bench,
like ensemble_teacher below; Bench.trained() trains and caches any intermediate model the same way as the teacher.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import time
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from distill.checkpoint import (
    atomic_write_text,
    load_model_file,
    load_weights,
    save_model,
)
from distill.data import load_dataset
from distill.data.arrays import ArrayDataset
from distill.errors import UserError
from distill.methods import REGISTRY, Method, MethodConfig, build_method
from distill.recipe import TrainConfig
from distill.signals import GeneralistWithSpecialists, LiveTeacher, TeacherEnsemble, find_class_sets, train_specialists
from distill.students import CNNConfig, MLPConfig, build_model
from distill.tasks.classification import evaluate
from distill.train import fit

# The teacher's forward passes are most of the bench's time (about 20 passes over the training set per seed and
# epoch, all rows together): [16, 32] channels take 2.9 s per pass on 2 cores, [32, 64] would take 6.2 s.
TEACHER = CNNConfig(channels=[16, 32], hidden=[128], dropout=0.3)
STUDENTS = {
    "mlp": MLPConfig(hidden=[128]),
    # attention transfer needs conv maps on both sides: a CNN with half the teacher's channels
    "cnn": CNNConfig(channels=[8, 16], hidden=[64]),
}
BATCH_SIZE, LR = 128, 1e-3
ENSEMBLE_SEEDS = (0, 1, 2)  # seed 0 is the single teacher itself
# One temperature for every soft-target row, so rows differ by method only. T = 1, not the digits tests' 4: with this
# CNN teacher and MLP student, KD lost to scratch the more the higher T (validation accuracy, 30k-image subset,
# 8 epochs, seed 0: T 4 -1.35, T 2 -0.50, T 1 -0.05 points; the same order on 3k and 15k images and for the CNN
# student). The kd-t4 row keeps the T = 4 result in the table.
T = 1.0


def config(method: str, **fields) -> MethodConfig:
    return REGISTRY[method].Config(**fields)


def single_teacher(bench: "Bench") -> nn.Module:
    return bench.teacher(0)


def ensemble_teacher(bench: "Bench") -> nn.Module:
    """The teacher and two more trained with seeds 1 and 2, their probabilities averaged."""
    return TeacherEnsemble([bench.teacher(s) for s in ENSEMBLE_SEEDS], combine="probs")


def assistant_teacher(bench: "Bench") -> nn.Module:
    """Teacher-assistant chain (Mirzadeh et al. 2020): the CNN student's architecture, distilled from the teacher
    (KD, T as the other rows, the teacher's epochs), teaches the MLP student."""
    kd = build_method(config("kd", temperature=T), LiveTeacher(bench.teacher(0)))
    return bench.trained("assistant", STUDENTS["cnn"], kd, bench.teacher_train, seed=0, taught_by="teacher")


SPECIALISTS = {"count": 3, "temperature": 4.0, "epochs": 5}


def specialists_teacher(bench: "Bench") -> nn.Module:
    """Hinton et al. 2015 §5: class sets from clustering the teacher's softened predictions on the training rows,
    one specialist per set (the teacher's architecture + a dustbin output, from its weights, 5 epochs on rows
    half from its classes), combined with the teacher per row. Trained once and stored in the work dir."""
    generalist = bench.teacher(0)
    name = "specialists"
    bench.asked.append(name)
    if name in bench.models:
        return bench.models[name]
    with torch.inference_mode():
        logits = torch.cat([generalist(x) for x in bench.data.train.x.split(2048)])
    sets = find_class_sets(torch.softmax(logits / SPECIALISTS["temperature"], -1), SPECIALISTS["count"], seed=0)
    train = bench.teacher_train.model_copy(update={"epochs": SPECIALISTS["epochs"]})
    settings = as_json({"class_sets": sets, **SPECIALISTS, "train": train.model_dump(), "generalist": "teacher",
                        "limit_train": bench.args.limit_train})
    build = lambda n: build_model(TEACHER, bench.data.input_shape, n)  # noqa: E731
    path = bench.work / f"{name}.safetensors"
    specialists = nn.ModuleList([build(len(c) + 1) for c in sets])
    if path.exists():
        state, stored = load_model_file(path)
        if stored.get("settings") != settings:
            raise UserError(f"{path} was trained with other settings; delete it or pass another --work-dir")
        load_weights(specialists, state, str(path))
        info = stored
    else:
        print(f"training specialists on {sets} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        specialists = nn.ModuleList(train_specialists(generalist, bench.data, sets, build, train, seed=0))
        info = {"settings": settings, "train_seconds": time.perf_counter() - t0, "epochs": train.epochs}
        save_model(path, specialists, info)
    combined = GeneralistWithSpecialists(generalist, list(specialists.eval()), sets).eval()
    info = {**info, "test": evaluate(combined, bench.data.test)}
    print(f"{name} {sets}: test accuracy {100 * info['test']['accuracy']:.2f}%", file=sys.stderr, flush=True)
    bench.models[name], bench.model_info[name] = combined, info
    return combined


@dataclass(frozen=True)
class Entry:
    config: MethodConfig  # the method and all its settings
    teacher: Callable[["Bench"], nn.Module] | None = single_teacher  # a named function (its name is a setting)
    student: str = "mlp"  # a key of STUDENTS
    baseline: str = "scratch"  # the "delta vs scratch" row: the same student trained alone
    kd_row: str = "kd"  # the "delta vs KD" row: the same student and teacher with plain KD
    note: str = ""


# Layers are named as in dict(model.named_modules()): MLP net = [Flatten, Linear, ReLU, Linear]; CNN features =
# [conv, bn, relu, pool] per block, head = [Flatten, Linear, ReLU, Dropout?, Linear].
CNN_ROWS = {"student": "cnn", "baseline": "scratch-cnn", "kd_row": "kd-cnn"}
METHODS: dict[str, Entry] = {
    "scratch": Entry(config("supervised"), teacher=None, note="MLP student alone (cross-entropy)"),
    "kd": Entry(config("kd", temperature=T), note="Hinton KD, 0.1·CE + 0.9·T²·KL"),
    "kd-t4": Entry(config("kd", temperature=4.0), note="KD at T = 4 (the digits tests' setting)"),
    # DKD's beta: 8 (its CIFAR-100 value) lost 2.0 points to scratch in the probe above, 0.5 (ImageNet) gained 0.15
    "dkd": Entry(config("dkd", temperature=T, beta=0.5, warmup_epochs=2),
                 note="alpha 1, beta 0.5 (the paper's ImageNet value); DKD term ramped up over 2 epochs"),
    "topk": Entry(config("topk", temperature=T, k=3), note="teacher's top 3 classes + one bucket for the rest"),
    "noisy": Entry(config("noisy", temperature=T), note="σ 0.1 multiplicative noise on half the batches"),
    # derivative_weight 1/16 keeps the default's scale at T = 4 (the term shrinks as 1/T²); weight 1 at T = 1
    # lost 0.7 points on validation (15k images)
    "sobolev": Entry(config("sobolev", temperature=T, derivative_weight=1 / 16),
                     note="KD + input derivatives along 1 random direction, weight 1/16"),
    # hint_weight 1 (the default) lost 0.9 points to 0.1 on validation (15k images)
    "hints": Entry(config("hints", temperature=T, student_layer="net.2", teacher_layer="head.2", hint_weight=0.1),
                   note="KD + 0.1·MSE(Linear(student hidden ReLU), teacher head ReLU)"),
    "mutual": Entry(config("mutual", temperature=T), note="1 peer MLP + KL to the teacher"),
    # 3 steps of 0.05 instead of 10 of 0.03: a third of the cost (still ~5x KD per epoch), as in tests/test_bss.py
    "bss": Entry(config("bss", temperature=T, steps=3, step_size=0.05),
                 note="half the batch pushed to the teacher's boundary in 3 steps of 0.05 (paper: 10)"),
    "ensemble": Entry(config("kd", temperature=T), teacher=ensemble_teacher,
                      note="KD from 3 teachers (seeds 0, 1, 2), probabilities averaged"),
    "assistant": Entry(config("kd", temperature=T), teacher=assistant_teacher,
                       note="teacher -> CNN assistant (KD) -> MLP student (KD)"),
    "specialists": Entry(config("kd", temperature=T), teacher=specialists_teacher,
                         note="KD from the teacher + 3 specialists (class sets from its confusions), combined per row"),
    "scratch-cnn": Entry(config("supervised"), teacher=None, **CNN_ROWS, note="CNN student alone"),
    "kd-cnn": Entry(config("kd", temperature=T), **CNN_ROWS, note="KD, CNN student"),
    "attention": Entry(config("attention", temperature=T, student_layers=["features.3", "features.7"],
                              teacher_layers=["features.3", "features.7"]), **CNN_ROWS,
                       note="KD + AT on both conv blocks (14×14, 7×7 maps); CNN student"),
}


def as_json(value):
    """The JSON form a setting has once stored, so stored and current settings compare equal."""
    return json.loads(json.dumps(value))


def differing(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(stored) | set(wanted)):
        a, b = stored.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k} {a!r} -> {b!r}")
    return keys


class Bench:
    """The data, the settings and the trained teachers of one bench run."""

    def __init__(self, args, data):
        self.args, self.data = args, data
        self.work = Path(args.work_dir)
        self.teacher_train = TrainConfig(epochs=args.teacher_epochs, batch_size=BATCH_SIZE, lr=LR)
        self.student_train = TrainConfig(epochs=args.epochs, batch_size=BATCH_SIZE, lr=LR)
        self.models: dict[str, nn.Module] = {}
        self.model_info: dict[str, dict] = {}
        self.asked: list[str] = []  # models handed out by trained(), so a run can record its teachers' settings

    def trained(self, name: str, model_config, method: Method, train: TrainConfig, seed: int,
                taught_by: str | None = None) -> nn.Module:
        """`<work-dir>/<name>.safetensors`, trained now if absent (torch.manual_seed(seed), then fit)."""
        self.asked.append(name)
        if name in self.models:
            return self.models[name]
        path = self.work / f"{name}.safetensors"
        settings = as_json({"model": model_config.model_dump(), "method": method.config.model_dump(),
                            "taught_by": taught_by, "train": train.model_dump(), "seed": seed,
                            "limit_train": self.args.limit_train})
        if path.exists():
            model = build_model(model_config, self.data.input_shape, self.data.num_classes)
            state, stored = load_model_file(path)
            if stored.get("settings") != settings:
                diff = "; ".join(differing(stored.get("settings") or {}, settings))
                raise UserError(f"{path} was trained with other settings ({diff}); "
                                "delete it or pass another --work-dir")
            load_weights(model, state, str(path))
            info = stored
        else:
            torch.manual_seed(seed)
            model = build_model(model_config, self.data.input_shape, self.data.num_classes)
            print(f"training {name} ({train.epochs} epochs) ...", file=sys.stderr, flush=True)
            result = fit(model, method, self.data.train, self.data.val, train, seed=seed, progress=False)
            info = {"settings": settings, "train_seconds": result.train_seconds, "epochs": len(result.history)}
            save_model(path, model, info)
        info = {**info, "test": evaluate(model, self.data.test)}
        print(f"{name}: test accuracy {100 * info['test']['accuracy']:.2f}%, trained in "
              f"{info['train_seconds']:.0f} s", file=sys.stderr, flush=True)
        self.models[name], self.model_info[name] = model.eval(), info
        return model.eval()

    def teacher(self, seed: int = 0) -> nn.Module:
        name = "teacher" if seed == 0 else f"teacher-seed{seed}"
        return self.trained(name, TEACHER, build_method(config("supervised")), self.teacher_train, seed)

    def run_path(self, name: str, seed: int) -> Path:
        return self.work / "runs" / f"{name}-seed{seed}.json"

    def teacher_of(self, name: str) -> tuple[nn.Module | None, dict]:
        """The row's teacher (trained or loaded) and the stored settings of every model it is made of."""
        entry = METHODS[name]
        if entry.teacher is None:
            return None, {}
        self.asked = []
        teacher = entry.teacher(self)
        return teacher, {n: self.model_info[n]["settings"] for n in dict.fromkeys(self.asked)}

    def run_settings(self, name: str, teachers: dict) -> dict:
        entry = METHODS[name]
        return as_json({"method": entry.config.model_dump(), "teacher": entry.teacher and entry.teacher.__name__,
                        "teachers": teachers, "student": STUDENTS[entry.student].model_dump(),
                        "train": self.student_train.model_dump(), "limit_train": self.args.limit_train})

    def stored_run(self, name: str, seed: int, settings: dict) -> dict | None:
        path = self.run_path(name, seed)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("settings") != settings:
            diff = "; ".join(differing(record.get("settings") or {}, settings))
            raise UserError(f"{path} was run with other settings ({diff}); delete it or pass another --work-dir")
        return record

    def run(self, name: str, seed: int) -> tuple[dict, bool]:
        """The (method, seed) run's record, and whether it was stored already."""
        entry = METHODS[name]
        teacher, teachers = self.teacher_of(name)  # first: a run stored with other teachers must not be reused
        settings = self.run_settings(name, teachers)
        record = self.stored_run(name, seed, settings)
        if record is not None:
            return record, True
        method = build_method(entry.config, LiveTeacher(teacher) if teacher is not None else None)
        torch.manual_seed(seed)  # the same initial weights for every method of this seed
        model = build_model(STUDENTS[entry.student], self.data.input_shape, self.data.num_classes)
        result = fit(model, method, self.data.train, self.data.val, self.student_train, seed=seed, progress=False)
        test = evaluate(model, self.data.test)
        epochs = len(result.history)
        record = {
            "method": name, "seed": seed, "accuracy_pct": 100 * test["accuracy"], "errors": test["errors"],
            "test_rows": test["n"], "epochs": epochs, "best_epoch": result.best_epoch,
            "train_seconds": result.train_seconds, "seconds_per_epoch": result.train_seconds / epochs,
            "settings": settings,
        }
        atomic_write_text(self.run_path(name, seed), json.dumps(record, indent=1) + "\n")
        return record, False


def mean_std(values: list[float], signed: bool = False) -> str:
    fmt = "+.2f" if signed else ".2f"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {statistics.stdev(values):.2f}"


def paired_delta(records: dict, name: str, other: str, seeds: list[int]) -> str:
    """Mean ± std over seeds of (accuracy of `name` − accuracy of `other`) with the same seed, in points."""
    if name == other:
        return "—"
    pairs = [(records[name][s], records.get(other, {}).get(s)) for s in seeds]
    if any(b is None for _, b in pairs):
        return "—"
    return mean_std([a["accuracy_pct"] - b["accuracy_pct"] for a, b in pairs], signed=True)


def table(bench: Bench, names: list[str], records: dict, seeds: list[int], command: str) -> str:
    scratch = records.get("scratch")
    scratch_epoch = statistics.median(r["seconds_per_epoch"] for r in scratch.values()) if scratch else None
    rows = ["| method | test accuracy (%) | vs scratch (points) | vs KD (points) | s/epoch vs scratch | notes |",
            "|:---|---:|---:|---:|---:|:---|"]
    for name in names:
        entry = METHODS[name]
        runs = [records[name][s] for s in seeds]
        per_epoch = statistics.median(r["seconds_per_epoch"] for r in runs)
        seconds = f"({per_epoch:.{2 if per_epoch < 10 else 1}f} s)"
        speed = f"{per_epoch / scratch_epoch:.2f} {seconds}" if scratch_epoch else seconds
        rows.append(f"| {name} | {mean_std([r['accuracy_pct'] for r in runs])} | "
                    f"{paired_delta(records, name, entry.baseline, seeds)} | "
                    f"{paired_delta(records, name, entry.kd_row, seeds)} | {speed} | {entry.note} |")
    a, data = bench.args, bench.data
    trained = ", ".join(f"{n} {100 * i['test']['accuracy']:.2f}% ({i['epochs']} epochs, {i['train_seconds']:.0f} s)"
                        for n, i in bench.model_info.items())
    if all(("teacher" if s == 0 else f"teacher-seed{s}") in bench.models for s in ENSEMBLE_SEEDS):
        trained += f"; ensemble {100 * evaluate(ensemble_teacher(bench), data.test)['accuracy']:.2f}%"
    k_params = {k: sum(p.numel() for p in build_model(c, data.input_shape, data.num_classes).parameters()) / 1e3
                for k, c in {"teacher": TEACHER, **STUDENTS}.items()}
    machine = (f"{os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    smoke = [f"**Smoke run: {len(data.train):,} training images (--limit-train), not a result.**", ""]
    return "\n".join([
        "# Fashion-MNIST: every distillation method of distill",
        "",
        f"`{command}`",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {machine}.",
        "",
        *(smoke if a.limit_train else []),
        *rows,
        "",
        (f"Test set: the {len(data.test):,} Fashion-MNIST test images; accuracy mean ± std over seeds "
        f"{', '.join(map(str, seeds))}. Deltas are paired by seed (same initial weights and batches): mean ± std "
        "of the per-seed differences. The CNN rows (scratch-cnn, kd-cnn, attention) take their deltas against the "
        "CNN student's own scratch and KD rows. s/epoch: median training seconds per epoch (teacher passes "
        "included, validation excluded) relative to the MLP scratch row, absolute in brackets."),
        "",
        (f"Teacher: CNN channels {TEACHER.channels}, hidden {TEACHER.hidden}, dropout {TEACHER.dropout} "
        f"({k_params['teacher']:.0f}k parameters), {a.teacher_epochs} epochs. Test accuracy of the trained "
        f"models: {trained}."),
        "",
        (f"Students: MLP hidden {STUDENTS['mlp'].hidden} ({k_params['mlp']:.0f}k parameters); CNN channels "
        f"{STUDENTS['cnn'].channels}, hidden {STUDENTS['cnn'].hidden} ({k_params['cnn']:.0f}k parameters). "
        f"Every run: Adam lr {LR}, batch {BATCH_SIZE}, cosine schedule, {a.epochs} epochs on {len(data.train):,} "
        f"training images, the best epoch on {len(data.val):,} validation images kept. T = {T:g} in every "
        "soft-target row but kd-t4; other settings are the method defaults unless the notes say."),
    ])


def load_data(args):
    data = load_dataset("fashion-mnist", data_dir=args.data_dir)
    if args.limit_train:
        if args.limit_train > len(data.train):
            raise UserError(f"--limit-train {args.limit_train} is more than the {len(data.train)} training images; "
                            "pass a smaller number")
        # a fixed random subset (the same for every run), so all classes are present
        keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[: args.limit_train]
        data.train = ArrayDataset(data.train.x[keep], data.train.y[keep])
    return data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-dir", default=None, help="folder holding fashion-mnist/ (IDX files)")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"rows to run (default all: {' '.join(METHODS)})")
    p.add_argument("--epochs", type=int, default=8, help="student epochs, every method")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--work-dir", default="/work/bench-runs/fashion", help="teachers and finished runs, reused")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="train on N images only (smoke test)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "fashion_methods.md"))
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    try:
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            raise UserError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        for flag in ("epochs", "teacher_epochs", "threads", "limit_train"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
        torch.set_num_threads(args.threads)
        bench = Bench(args, load_data(args))
        names = [m for m in METHODS if m in args.methods]  # table order = METHODS order
        records: dict[str, dict[int, dict]] = {}
        for seed in args.seeds:
            for name in names:
                r, stored = bench.run(name, seed)
                records.setdefault(name, {})[seed] = r
                print(f"{name:12s} seed {seed}: {r['accuracy_pct']:.2f}% ({r['errors']} errors), best epoch "
                      f"{r['best_epoch']}/{r['epochs']}, {r['seconds_per_epoch']:.2f} s/epoch"
                      f"{' (stored)' if stored else ''}", flush=True)
        # baselines (and scratch, the time unit) not selected this time still count when their runs are on disk
        wanted = {"scratch"} | {METHODS[n].baseline for n in names} | {METHODS[n].kd_row for n in names}
        for name in sorted(wanted - set(records)):
            if name in METHODS and any(bench.run_path(name, s).exists() for s in args.seeds):
                settings = bench.run_settings(name, bench.teacher_of(name)[1])
                found = {s: bench.stored_run(name, s, settings) for s in args.seeds}
                records[name] = {s: r for s, r in found.items() if r is not None}
        bench.teacher(0)  # its accuracy goes in the header even when every run was reused
        text = table(bench, names, records, args.seeds, command)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text + "\n")
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
