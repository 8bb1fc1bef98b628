"""Kim & Rush (2016) on en-es: the teacher, the student alone, word-level KD, sequence-level KD, sequence-level
interpolation and word + sequence KD, with greedy and beam BLEU, chrF, parameters and decoding speed-up.

    python bench/translation_kd.py --data-dir ../shared/data --work-dir /work/bench-runs/en-es [--teacher DIR] [--resume] [key=value ...]

One run of recipes/en-es.yaml: `distill run en-es` trains the teacher, writes its beam search (beam 5, the 5 best
kept) over the students' training sources (data.targets: auto), and trains the baseline (scratch), the word-KD
student and the seq-KD, seq-inter and word+seq variants from the same initial weights; with --teacher DIR, `distill
distill en-es --teacher DIR` does the same from that teacher. --resume continues a killed run. The table is printed
and written to bench/results/en-es_kd.{md,json}. Decoding speed is measured after the run by
bench/translation_speed.py, every model in one process taking turns (--sentences test sentences, --rounds rounds,
--threads threads): greedy at batch 1 in ms per sentence, and the speed-up over the teacher's greedy decoding and
over its beam search (beam 5), both at batch 1. Overrides (key=value) go to the command, e.g. data.train_rows=2000
student.train.epochs=2 for a quick try.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from translation_speed import format_speed, measure

RESULTS = Path(__file__).parent / "results"
NAMES = {"scratch": "baseline (scratch)", "student": "word-KD", "seq-kd": "seq-KD"}  # roles of the run -> table rows


def row(name: str, m: dict, speed: dict) -> dict:
    return {"model": name, "bleu_greedy": m["bleu"], "bleu_beam": m["bleu_beam"], "chrf": m["chrf"],
            "params_m": m["params"] / 1e6, "greedy_ms": speed["greedy_b1_ms_per_sentence"],
            "speedup_vs_greedy": speed["speedup_vs_teacher_greedy"], "speedup_vs_beam": speed["speedup_vs_teacher_beam"]}


def table(models: dict, speed: dict) -> tuple[list[dict], str]:
    rows = [row(NAMES.get(role, role), m, speed[role]) for role, m in models.items()]
    head = ("| model | BLEU greedy | BLEU beam | beam - greedy | chrF | params (M) | ms / sentence (greedy, b1) | "
            "speed-up vs teacher greedy | vs teacher beam 5 |")
    lines = [head, "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bleu_greedy']:.2f} | {r['bleu_beam']:.2f} | {r['bleu_beam'] - r['bleu_greedy']:+.2f} | "
                     f"{r['chrf']:.2f} | {r['params_m']:.2f} | {r['greedy_ms']:.1f} | {r['speedup_vs_greedy']:.1f} | "
                     f"{r['speedup_vs_beam']:.1f} |")
    return rows, "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--teacher", help="a trained en-es teacher's folder (e.g. WORK/runs/en-es/teacher): not trained again")
    p.add_argument("--resume", action="store_true", help="continue a killed run (WORK/runs/NAME.partial)")
    p.add_argument("--no-run", action="store_true", help="WORK/runs/NAME is finished: only time its models and tabulate")
    p.add_argument("--sentences", type=int, default=200, help="test sentences timed per model (translation_speed.py)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, taking turns")
    p.add_argument("--threads", type=int, default=1, help="threads while timing")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    runs = a.work_dir / "runs"
    command = ["distill", "en-es", "--teacher", a.teacher] if a.teacher else ["run", "en-es"]
    cmd = [sys.executable, "-m", "distill.cli", *command, "--data-dir", a.data_dir, "--quiet", f"output_dir={runs}",
           *(["--resume"] if a.resume else []), *a.overrides]
    if not a.no_run:
        print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    name = next((o.partition("=")[2] for o in reversed(a.overrides) if o.startswith("name=")), "en-es")
    torch.set_num_threads(a.threads)
    speed = measure(runs / name, a.data_dir, sentences=a.sentences, rounds=a.rounds, teacher=a.teacher,
                    progress=lambda line: print(line, file=sys.stderr, flush=True))
    rows, text = table(json.loads((runs / name / "results.json").read_text())["models"], speed["models"])
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "en-es_kd.json").write_text(json.dumps({"overrides": a.overrides, "rows": rows, "speed": speed}, indent=1) + "\n")
    given = ["--sentences", str(a.sentences), *(["--teacher", a.teacher] if a.teacher else []), *a.overrides]
    (RESULTS / "en-es_kd.md").write_text(f"`python bench/translation_kd.py {' '.join(given)}`\n\n{text}\n\n"
                                         f"Decoding speed:\n\n{format_speed(speed)}\n")


if __name__ == "__main__":
    main()
