"""Text students vs a fine-tuned MiniLM teacher, each trained without a teacher (scratch) and distilled, over seeds.

    python bench/text_students.py imdb-minilm --data-dir ../shared/data --seeds 0 1 2 --work-dir /work/bench-runs/imdb
    python bench/text_students.py ner-tagger --seeds 0 1 2 --work-dir /work/bench-runs/ner

1. the recipe's teacher is fine-tuned once (work-dir/teacher/<recipe>/teacher, reused when there);
2. its logits over the students' rows are cached once (`distill cache`, reused when there);
3. every student architecture x seed trains as `scratch` and `student` (KD from the cache) from the same initial
   weights and batches (`distill distill --teacher`); students start from the fine-tuned teacher (hf-shrink: its
   kept layers; bilstm / textcnn: its embeddings), scratch and distilled alike;
4. a table of test score, parameters, MB, latency per example at batch 1 and throughput at batch 32 (median of the
   run's repeats, on this machine), speed-up vs the teacher, and distilled - scratch paired by seed, is printed and
   written to bench/results/<recipe>_students.{md,json}.
Runs are resumable: a finished run folder is read, not trained again.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


RESULTS = Path(__file__).parent / "results"
STUDENTS = {
    "imdb-minilm": {
        "textcnn": {"kind": "textcnn", "embedding_dim": 128, "channels": 128, "kernel_sizes": [3, 5], "dropout": 0.3},
        "textcnn-wide": {"kind": "textcnn", "embedding_dim": 256, "channels": 256, "kernel_sizes": [3, 5], "dropout": 0.3},
        "bilstm": {"kind": "bilstm", "embedding_dim": 128, "hidden": 128, "layers": 1, "dropout": 0.3},
        "minilm-2L": {"kind": "hf-shrink", "layers": [0, 5]},
    },
    "ner-tagger": {
        "bilstm": {"kind": "bilstm", "embedding_dim": 128, "hidden": 128, "layers": 2, "dropout": 0.2},
        "textcnn": {"kind": "textcnn", "embedding_dim": 128, "channels": 128, "kernel_sizes": [3, 3, 3], "dropout": 0.2},
    },
}
TRAIN = {  # per student kind, when it differs from the recipe's student.train
    "minilm-2L": {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.0001, "weight_decay": 0.01,
                  "warmup_epochs": 0.1, "schedule": "linear"},
}


def distill_cli(*args) -> None:
    quiet = ["--quiet"] if args[0] != "cache" else []  # no progress bars in a log
    cmd = [sys.executable, "-m", "distill.cli", *map(str, args), *quiet]
    print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", choices=sorted(STUDENTS))
    p.add_argument("--data-dir")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--students", nargs="+", help="student names (default: all of the recipe's)")
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--unlabelled-fraction", type=float, help="hide the labels of this share of the training rows")
    p.add_argument("--teacher", type=Path, help="a fine-tuned teacher folder to reuse (default: train one in the work dir)")
    args = p.parse_args()
    work = args.work_dir.resolve()
    common = [f"--data-dir={args.data_dir}"] if args.data_dir else []
    if args.unlabelled_fraction:
        common.append(f"data.unlabelled_fraction={args.unlabelled_fraction}")
    teacher = args.teacher.resolve() if args.teacher else work / "teacher" / args.recipe / "teacher"
    if not teacher.is_dir():
        distill_cli("train", args.recipe, f"output_dir={work / 'teacher'}", "teacher.cache=null", *common)
    cache = work / "cache"
    if not cache.is_dir():
        distill_cli("cache", args.recipe, "--teacher", teacher, "--out", cache, "--dtype", "float32", *common)
    rows = {}
    for name in args.students or STUDENTS[args.recipe]:
        model = json.dumps(STUDENTS[args.recipe][name])
        train = [f"student.train={json.dumps({**TRAIN[name]})}"] if name in TRAIN else []
        for seed in args.seeds:
            run = work / "runs" / f"{name}-s{seed}"
            if not (run / "results.json").is_file():
                distill_cli("distill", args.recipe, "--teacher", teacher, f"name={run.name}", f"output_dir={run.parent}",
                            f"seed={seed}", f"student.model={model}", f"teacher.cache={cache}", *train, *common)
    for name in STUDENTS[args.recipe]:  # every finished run in the work dir, also those of earlier invocations
        for run in sorted((work / "runs").glob(f"{name}-s*/results.json")):
            rows[(name, int(run.parent.name.rsplit("-s", 1)[1]))] = json.loads(run.read_text())["models"]
    report(args.recipe, rows, work)


def report(recipe: str, rows: dict, work: Path) -> None:
    first = next(iter(rows.values()))
    teacher = first["teacher"]
    metric = teacher["metric"]
    scale = 100 if metric == "accuracy" else 100  # accuracy and F1 in %
    lines = [f"# {recipe}: students vs the fine-tuned teacher", "",
             f"`python bench/text_students.py {recipe} ...` (work dir {work}); test {metric} in %, mean ± std over the "
             "seeds of each row (0, 1, 2 in that order); latency per example at batch 1 and throughput at batch 32 on this machine "
             "(median of the run's repeats); speed-up = teacher latency / student latency.", "",
             f"| model | seeds | params (M) | MB fp32 | {metric} scratch | {metric} distilled | distilled - scratch (paired) "
             "| % of teacher | latency ms (b1) | speed-up | throughput /s (b32) |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| teacher (MiniLM-L6) | - | {teacher['params'] / 1e6:.2f} | {teacher['size_mb_fp32']:.1f} | - | "
             f"{teacher['score'] * scale:.2f} | - | 100 | {teacher['latency_ms']:.2f} | 1.0 | {teacher['throughput_per_s']:.0f} |"]
    summary = {"teacher": teacher, "students": {}}
    for name in dict.fromkeys(n for n, _ in rows):
        runs = [m for (n, _), m in rows.items() if n == name]
        sc = [m["scratch"]["score"] * scale for m in runs]
        kd = [m["student"]["score"] * scale for m in runs]
        diff = [b - a for a, b in zip(sc, kd)]
        student = runs[0]["student"]
        lat = statistics.median(m["student"]["latency_ms"] for m in runs)
        t_lat = statistics.median(m["teacher"]["latency_ms"] for m in runs)
        summary["students"][name] = {"scratch": sc, "distilled": kd, "paired_diff": diff, "params": student["params"],
                                     "latency_ms": lat, "teacher_latency_ms": t_lat}
        lines.append(f"| {name} | {len(runs)} | {student['params'] / 1e6:.2f} | {student['size_mb_fp32']:.1f} | {_ms(sc)} | {_ms(kd)} | "
                     f"{_ms(diff, sign=True)} | {statistics.mean(kd) / (teacher['score'] * scale) * 100:.1f} | {lat:.2f} | "
                     f"{t_lat / lat:.1f} | {statistics.median(m['student']['throughput_per_s'] for m in runs):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{recipe}_students.md").write_text(text)
    (RESULTS / f"{recipe}_students.json").write_text(json.dumps(summary, indent=1) + "\n")


def _ms(values: list[float], sign: bool = False) -> str:
    mean = statistics.mean(values)
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""  # one seed: no spread to show
    return f"{mean:+.2f}{spread}" if sign else f"{mean:.2f}{spread}"


if __name__ == "__main__":
    main()
