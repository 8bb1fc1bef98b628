"""Decoding speed of a finished translation run's models, measured in one process, taking turns.

    python bench/translation_speed.py RUN_DIR --data-dir ../shared/data [--sentences 100] [--rounds 3] [--threads 1]

The report of `distill run` times each model right after it trains, so on a shared machine the teacher and the
students are timed under different loads. Here every model of RUN_DIR (teacher, scratch, student, variants) decodes
the same test sentences, one model after the other, `--rounds` times; per model the median round is kept:
- greedy, batch 1: ms per sentence and generated tokens per second (the deployment case Kim & Rush time);
- beam 5, batch 1: the same with the task's beam (the teacher's usual decoding; Kim & Rush's students decode
  greedily instead);
- greedy, batch 32: sentences per second over the same sentences (sorted by length, as the report decodes).
Speed-ups are the teacher's time over the model's: vs the teacher's greedy and vs the teacher's beam search.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

ROLES_FIRST = ("teacher", "scratch", "student")
MODES = {"greedy_b1": (1, 1), "beam_b1": (5, 1), "greedy_b32": (1, 32)}  # mode -> (beams, batch size)


def model_folders(run_dir: Path, teacher: str | None = None) -> dict[str, Path]:
    """role -> model folder of a finished run, teacher first (folders holding distill.json); `teacher`: the folder
    of the teacher given to `distill distill --teacher`, for a run that did not train its own."""
    found = {p.name: p for p in sorted(run_dir.iterdir()) if (p / "distill.json").is_file()}
    if teacher and "teacher" not in found:
        found["teacher"] = Path(teacher)
    return {r: found[r] for r in (*[r for r in ROLES_FIRST if r in found], *[r for r in found if r not in ROLES_FIRST])}


def pick_rows(test, sentences: int, seed: int = 0):
    """A seeded draw of `sentences` test rows as a TokenizedPairs of their own."""
    from distill.data.parallel import TokenizedPairs

    idx = sorted(random.Random(seed).sample(range(len(test)), min(sentences, len(test))))
    return TokenizedPairs([test.sources[i] for i in idx], [test.targets[i] for i in idx], test.pad_id, test.start_id,
                          source_texts=[test.source_texts[i] for i in idx], references=[test.references[i] for i in idx])


def time_mode(task, model, rows, beams: int, batch: int) -> tuple[float, int]:
    """(seconds to translate every row, tokens generated)."""
    t0 = time.perf_counter()
    texts = task.translate(model, rows, num_beams=beams, batch_size=batch)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(task.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # + </s>


def measure(run_dir: Path, data_dir: str | None, *, sentences: int = 100, rounds: int = 3, teacher: str | None = None,
            progress=print) -> dict:
    from distill.saved import load_saved

    folders = model_folders(run_dir, teacher)
    teacher, task, data = load_saved(str(folders["teacher"]), data_dir=data_dir)
    models = {"teacher": teacher, **{r: task.load_model(str(f), data).eval() for r, f in folders.items() if r != "teacher"}}
    rows = pick_rows(data.test, sentences)
    plan = [(r, m) for r in models for m in MODES]
    seconds = {key: [] for key in plan}
    tokens = {}
    for model in models.values():  # one untimed pass each: lazy initialisation, allocator warm-up
        task.translate(model, pick_rows(data.test, 4, seed=1), num_beams=1, batch_size=1)
    for r in range(rounds):
        for role, mode in plan:
            beams, batch = MODES[mode]
            s, n = time_mode(task, models[role], rows, beams, batch)
            seconds[(role, mode)].append(s)
            tokens[(role, mode)] = n
            progress(f"round {r + 1}/{rounds} {role:10s} {mode:10s} {s * 1000 / len(rows):8.1f} ms/sentence")
    out = {}
    for role in models:
        med = {mode: statistics.median(seconds[(role, mode)]) for mode in MODES}
        out[role] = {
            "params": sum(p.numel() for p in models[role].parameters()),
            **{f"{mode}_ms_per_sentence": med[mode] * 1000 / len(rows) for mode in MODES},
            **{f"{mode}_tokens_per_s": tokens[(role, mode)] / med[mode] for mode in MODES},
            "greedy_b32_sentences_per_s": len(rows) / med["greedy_b32"],
            "round_seconds": {mode: seconds[(role, mode)] for mode in MODES},
        }
    t = out["teacher"]
    for m in out.values():
        m["speedup_vs_teacher_greedy"] = t["greedy_b1_ms_per_sentence"] / m["greedy_b1_ms_per_sentence"]
        m["speedup_vs_teacher_beam"] = t["beam_b1_ms_per_sentence"] / m["greedy_b1_ms_per_sentence"]
        m["speedup_b32_vs_teacher"] = m["greedy_b32_sentences_per_s"] / t["greedy_b32_sentences_per_s"]
    return {"sentences": len(rows), "rounds": rounds, "threads": torch.get_num_threads(), "models": out}


def format_speed(result: dict) -> str:
    lines = [f"{result['sentences']} test sentences, {result['rounds']} rounds taking turns (median round), "
             f"{result['threads']} thread(s)", "",
             "| model | params (M) | greedy b1 ms/sent | greedy b1 tok/s | beam5 b1 ms/sent | greedy b32 sent/s | "
             "speed-up vs teacher greedy (b1) | vs teacher beam5 (b1) | vs teacher (b32) |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for role, m in result["models"].items():
        lines.append(f"| {role} | {m['params'] / 1e6:.2f} | {m['greedy_b1_ms_per_sentence']:.1f} | "
                     f"{m['greedy_b1_tokens_per_s']:.0f} | {m['beam_b1_ms_per_sentence']:.1f} | "
                     f"{m['greedy_b32_sentences_per_s']:.1f} | {m['speedup_vs_teacher_greedy']:.1f} | "
                     f"{m['speedup_vs_teacher_beam']:.1f} | {m['speedup_b32_vs_teacher']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished run's folder, e.g. runs/en-es")
    p.add_argument("--data-dir")
    p.add_argument("--sentences", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="also write the result here (.json) and next to it (.md)")
    a = p.parse_args()
    if a.sentences < 1 or a.rounds < 1 or a.threads < 1:
        p.error("--sentences, --rounds and --threads must be at least 1")
    torch.set_num_threads(a.threads)
    result = measure(a.run_dir, a.data_dir, sentences=a.sentences, rounds=a.rounds)
    text = format_speed(result)
    print(text)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        a.out.with_suffix(".md").write_text(f"`python bench/translation_speed.py {a.run_dir} --sentences {a.sentences} "
                                            f"--rounds {a.rounds} --threads {a.threads}`\n\n{text}\n")


if __name__ == "__main__":
    main()
