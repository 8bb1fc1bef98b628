"""Kim & Rush (2016) on en-es: the teacher, the student alone, word-level KD, sequence-level KD, sequence-level
interpolation and word + sequence KD, with greedy and beam BLEU, chrF, parameters and decoding speed-up.

    python bench/translation_kd.py --data-dir ../shared/data --work-dir /work/bench-runs/en-es [key=value ...]

1. the recipe's teacher (recipes/en-es.yaml) is trained once: `distill train en-es` (reused when there);
2. its beam search (beam 5, the 5 best kept) over the students' training sources: `distill generate` (resumable);
3. five students from the same initial weights and batches, each `distill distill --teacher`:
   baseline (scratch, references), word-KD (KL per target token + reference NLL, weights 0.5 / 0.5),
   seq-KD (the teacher's best translation as the target), seq-inter (of its 5 best, the closest to the reference by
   sentence BLEU), word + seq (word-KD on the teacher's translations);
4. the table is printed and written to bench/results/en-es_kd.{md,json}; latency is greedy decoding of the median-
   length test sentence at batch 1 (distill's report), speed-up = teacher latency / student latency.
Overrides (key=value) go to every command, e.g. data.train_rows=2000 student.train.epochs=2 for a quick try.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REGIMES = {  # name -> (run name, extra overrides, scratch too)
    "word-KD": ("word", [], True),
    "seq-KD": ("seq", ["data.targets={gen}", "distill.soft_weight=0", "distill.hard_weight=1"], False),
    "seq-inter": ("inter", ["data.targets={gen}", "data.target_choice=closest", "distill.soft_weight=0",
                            "distill.hard_weight=1"], False),
    "word+seq": ("word-seq", ["data.targets={gen}"], False),
}


def distill_cli(*args) -> None:
    cmd = [sys.executable, "-m", "distill.cli", *map(str, args)]
    print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def row(name: str, m: dict, teacher: dict) -> dict:
    speed = teacher["latency_ms"] / m["latency_ms"] if m.get("latency_ms") else None
    return {"model": name, "bleu_greedy": m["bleu"], "bleu_beam": m["bleu_beam"], "chrf": m["chrf"],
            "params_m": m["params"] / 1e6, "latency_ms": m["latency_ms"], "speedup": speed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    runs, gen = a.work_dir / "runs", a.work_dir / "generated"
    # distill refuses an override that cannot take effect: teacher.* only where the teacher trains, and the rest
    # (student.*, distill.*) only where students do; data.* and others go everywhere
    base = ["--data-dir", a.data_dir, "--quiet", f"output_dir={runs}"]
    for_teacher = [o for o in a.overrides if not o.startswith(("student.", "distill."))]
    common = [*base, *[o for o in a.overrides if not o.startswith("teacher.")]]
    teacher = runs / "teacher" / "teacher"
    if not teacher.is_dir():
        distill_cli("train", "en-es", *base, *for_teacher, "name=teacher")
    if not gen.is_dir():
        distill_cli("generate", "en-es", "--teacher", teacher, "--out", gen, "--beam", 5, "--k-best", 5, *common)
    results = {}
    for regime, (name, extra, scratch) in REGIMES.items():
        if not (runs / name / "results.json").is_file():
            distill_cli("distill", "en-es", "--teacher", teacher, *common, f"name={name}",
                        *[e.format(gen=gen) for e in extra], *([] if scratch else ["--no-scratch"]))
        results[regime] = json.loads((runs / name / "results.json").read_text())["models"]
    t = results["word-KD"]["teacher"]
    rows = [row("teacher", t, t), row("baseline (scratch)", results["word-KD"]["scratch"], t)]
    rows += [row(regime, results[regime]["student"], t) for regime in REGIMES]
    head = "| model | BLEU greedy | BLEU beam | beam - greedy | chrF | params (M) | latency ms (greedy, b1) | speed-up |"
    lines = [head, "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bleu_greedy']:.2f} | {r['bleu_beam']:.2f} | {r['bleu_beam'] - r['bleu_greedy']:+.2f} | "
                     f"{r['chrf']:.2f} | {r['params_m']:.2f} | {r['latency_ms']:.1f} | {r['speedup']:.1f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "en-es_kd.json").write_text(json.dumps({"overrides": a.overrides, "rows": rows}, indent=1) + "\n")
    (RESULTS / "en-es_kd.md").write_text(f"`python bench/translation_kd.py {' '.join(a.overrides)}`\n\n{table}\n")


if __name__ == "__main__":
    main()
