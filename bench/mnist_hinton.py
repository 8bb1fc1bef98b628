"""Hinton, Vinyals & Dean 2015, §3 on MNIST: teacher, student alone, distilled student — ours vs the paper.

    python bench/mnist_hinton.py --data-dir ../shared/data --seeds 0 1 2

One teacher (seed 0) is trained once and reused; for every seed a scratch and a distilled student are trained
from the same initial weights. Interrupted? Run the same command again: finished runs are reused and an
unfinished one resumes. Prints a markdown table and writes it to <out>/mnist_hinton.md.
Also reports the time per epoch of distillation vs training the student alone, next to 1 + (teacher forward
time over the training set / scratch epoch time), the ratio a KD epoch should cost.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from distill.checkpoint import load_model_file
from distill.recipe import load_recipe
from distill.runner import run_recipe
from distill.tasks.classification import build_from_record, load_data

PAPER = {"teacher": 67, "scratch": 146, "student": 74}


def run(name: str, overrides: list[str], stages, teacher=None) -> dict:
    recipe = load_recipe("mnist-hinton", [f"name={name}", *overrides])
    done = Path(recipe.output_dir) / name / "results.json"
    if not done.exists():
        run_recipe(recipe, stages=stages, teacher_checkpoint=teacher, resume=True)
    return json.loads(done.read_text()) | {"dir": str(done.parent)}


def teacher_forward_seconds(teacher_path: str, overrides: list[str]) -> float:
    state, record = load_model_file(teacher_path)
    model = build_from_record(record, teacher_path)
    model.load_state_dict(state)
    model.eval()
    x = load_data(load_recipe("mnist-hinton", overrides)).train.x
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), 256):
            model(x[i : i + 256])
    return time.perf_counter() - t0


def median_epoch_seconds(run_dir: str, role: str) -> float:
    history = json.loads((Path(run_dir) / "history.json").read_text())[role]
    return statistics.median(h["seconds"] for h in history)


def mean_std(values):
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. student.train.epochs=10")
    args = p.parse_args()
    common = [f"output_dir={args.out}", *args.overrides]
    if args.data_dir:
        common.append(f"data.data_dir={args.data_dir}")

    teacher_run = run("mnist-hinton-teacher", common, stages=("teacher",))
    teacher_path = str(Path(teacher_run["dir"]) / "teacher.safetensors")
    rows = []
    for seed in args.seeds:
        r = run(f"mnist-hinton-seed{seed}", [*common, f"seed={seed}"], stages=("scratch", "student"), teacher=teacher_path)
        m = r["models"]
        rows.append({
            "seed": seed, "teacher": m["teacher"]["errors"], "scratch": m["scratch"]["errors"], "student": m["student"]["errors"],
            "ratio": median_epoch_seconds(r["dir"], "student") / median_epoch_seconds(r["dir"], "scratch"),
            "scratch_epoch": median_epoch_seconds(r["dir"], "scratch"),
            "speedup": m["teacher"]["latency_ms"] / m["student"]["latency_ms"],
            "params": (m["teacher"]["params"], m["student"]["params"]),
        })
    forward = teacher_forward_seconds(teacher_path, common)
    expected = 1 + forward / statistics.median(r["scratch_epoch"] for r in rows)

    lines = [
        "| run | teacher errors | student alone (scratch) | distilled student | fewer errors |",
        "|:---|---:|---:|---:|---:|",
        f"| Hinton et al. 2015 | {PAPER['teacher']} | {PAPER['scratch']} | {PAPER['student']} | {PAPER['scratch'] - PAPER['student']} |",
    ]
    for r in rows:
        lines.append(f"| distill, seed {r['seed']} | {r['teacher']} | {r['scratch']} | {r['student']} | {r['scratch'] - r['student']} |")
    if len(rows) > 1:
        lines.append(f"| distill, mean ± std | {rows[0]['teacher']} | {mean_std([r['scratch'] for r in rows])} | "
                     f"{mean_std([r['student'] for r in rows])} | {mean_std([r['scratch'] - r['student'] for r in rows])} |")
    t_params, s_params = rows[0]["params"]
    ratios = ", ".join(f"{r['ratio']:.2f}" for r in rows)
    seeds = ", ".join(str(r["seed"]) for r in rows)
    lines += [
        "",
        f"Test set: the 10,000 MNIST test images. Teacher {t_params / 1e6:.2f}M parameters, student {s_params / 1e6:.2f}M "
        f"({t_params / s_params:.1f}x fewer), student latency {rows[0]['speedup']:.1f}x lower at batch 1.",
        f"Time per epoch, distilled / alone: {ratios} (seeds {seeds}); "
        f"1 + teacher forward / scratch epoch = {expected:.2f} (teacher forward over the training set: {forward:.1f} s, "
        f"scratch epoch: {statistics.median(r['scratch_epoch'] for r in rows):.1f} s). CPU threads: {torch.get_num_threads()}.",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out) / "mnist_hinton.md"
    out.write_text(table + "\n")
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
