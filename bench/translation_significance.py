"""Which BLEU differences of a finished translation run are larger than the test set's sampling noise.

    python bench/translation_significance.py RUN_DIR --data-dir ../shared/data [--teacher DIR] [--samples 1000]

Every model of RUN_DIR translates the whole test split (greedy and beam, as the report scores it), and sacrebleu's
paired bootstrap resampling (Koehn 2004) compares each distilled student with the baseline (`scratch`): the same
resampled sentence sets for both systems, `--samples` times; p is the share of resamples in which the difference does
not hold. This is noise from the choice of test sentences only, not from the training seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from translation_speed import model_folders


def translations(run_dir: Path, data_dir: str | None, teacher: str | None, progress=print) -> tuple[list, dict]:
    """(references, {role: {"greedy": [...], "beam": [...]}}) of the test split, for every student of the run (the
    teacher's folder gives the task and data; it is not compared)."""
    from distill.saved import load_saved

    folders = model_folders(run_dir, teacher)
    if "scratch" not in folders or "teacher" not in folders:
        raise SystemExit(f"{run_dir} has no scratch model or no teacher: compare a finished run trained with its "
                         f"baseline, and give --teacher DIR when the run did not train its teacher")
    _, task, data = load_saved(str(folders["teacher"]), data_dir=data_dir)
    out = {}
    for role, folder in folders.items():
        if role == "teacher":
            continue
        model = task.load_model(str(folder), data).eval()
        # the report's decoding (its batch size and beam), so the BLEU here is the one in results.json
        out[role] = {"greedy": task.translate(model, data.test, num_beams=1),
                     "beam": task.translate(model, data.test, num_beams=task.num_beams)}
        progress(f"{role}: translated {len(data.test)} test sentences")
    return list(data.test.references), out


def paired_bootstrap(references: list, systems: dict, decoding: str, samples: int) -> list[dict]:
    """Per system (baseline first): BLEU, its bootstrap mean and 95% interval, and p of the difference to scratch."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    named = [("scratch", systems["scratch"][decoding])] + [
        (role, s[decoding]) for role, s in systems.items() if role != "scratch"]
    test = PairedTest(named, {"BLEU": BLEU(references=[references])}, references=None, test_type="bs",
                      n_samples=samples)
    _, scores = test()
    rows = []
    for name, result in zip(scores["System"], scores["BLEU"]):
        rows.append({"model": name, "decoding": decoding, "bleu": result.score, "mean": result.mean,
                     "ci95": result.ci, "p_vs_scratch": result.p_value})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished translation run's folder, e.g. runs/en-es")
    p.add_argument("--data-dir")
    p.add_argument("--teacher", help="the teacher folder given to `distill distill --teacher`, if the run has none")
    p.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="also write the rows here (.json) and next to it (.md)")
    a = p.parse_args()
    if a.samples < 100:
        p.error("--samples must be at least 100")
    torch.set_num_threads(a.threads)
    references, systems = translations(a.run_dir, a.data_dir, a.teacher)
    rows = [r for decoding in ("greedy", "beam") for r in paired_bootstrap(references, systems, decoding, a.samples)]
    lines = [f"paired bootstrap, {a.samples} resamples of the {len(references)} test sentences (sacrebleu)", "",
             "| model | decoding | BLEU | bootstrap mean ± 95% | p (vs scratch) |", "|:---|:---|---:|---:|---:|"]
    for r in rows:
        p_text = "-" if r["p_vs_scratch"] is None else f"{r['p_vs_scratch']:.4f}"
        lines.append(f"| {r['model']} | {r['decoding']} | {r['bleu']:.2f} | {r['mean']:.2f} ± {r['ci95']:.2f} | {p_text} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1) + "\n")
        teacher = f" --teacher {a.teacher}" if a.teacher else ""
        a.out.with_suffix(".md").write_text(f"`python bench/translation_significance.py {a.run_dir}{teacher} "
                                            f"--samples {a.samples}`\n\n{text}\n\n(p = 1/(samples+1) is the "
                                            f"smallest a bootstrap of that many resamples reports)\n")


if __name__ == "__main__":
    main()
