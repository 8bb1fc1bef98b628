"""What the defaults give on small public tables the defaults were not tuned on, next to a logistic regression.

    python bench/table_defaults.py --seeds 0 1 2 --work-dir /tmp/table-defaults

Each table is written as a CSV and distilled with a recipe that sets only `data:` (dataset, path, label_column)
plus the run's name and folder: every model, training and distillation setting is distill's default. The
logistic regression (scikit-learn, lbfgs, max_iter 5000, default C) is fitted on exactly the same standardised
training rows (distill's own seeded split, read back with distill.data.load_dataset) and scored on the same test
rows. Tables: scikit-learn's iris, wine and breast cancer, and the Palmer penguins (the `palmerpenguins` package's
CSV, numeric columns only, rows with a missing value dropped; skipped when the package is not installed).
"""

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import datasets
from sklearn.linear_model import LogisticRegression


def sklearn_table(loader) -> pd.DataFrame:
    bunch = loader()
    df = pd.DataFrame(bunch.data, columns=[f"f{i}" for i in range(bunch.data.shape[1])])
    df["label"] = bunch.target
    return df


def penguins_table() -> pd.DataFrame | None:
    spec = importlib.util.find_spec("palmerpenguins")  # located, not imported (it needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        return None
    csv = Path(list(spec.submodule_search_locations)[0]) / "data" / "penguins.csv"
    df = pd.read_csv(csv)[["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "species"]].dropna()
    return df.rename(columns={"species": "label"})


def tables() -> dict[str, pd.DataFrame]:
    out = {"iris": sklearn_table(datasets.load_iris), "wine": sklearn_table(datasets.load_wine),
           "breast-cancer": sklearn_table(datasets.load_breast_cancer)}
    penguins = penguins_table()
    if penguins is not None:
        out["penguins"] = penguins
    return out


def logistic_regression(csv: Path) -> tuple[float, float, int, int, int]:
    """(LR test accuracy, majority-class test accuracy, train rows, test rows, classes) on distill's split."""
    from distill.data import load_dataset

    d = load_dataset("table", path=str(csv), label_column="label")
    flat = lambda ds: (ds.x.reshape(len(ds.x), -1).numpy(), ds.y.numpy())  # noqa: E731
    (xt, yt), (xs, ys) = flat(d.train), flat(d.test)
    lr = LogisticRegression(max_iter=5000).fit(xt, yt)
    majority = float((ys == np.bincount(yt).argmax()).mean())
    return float((lr.predict(xs) == ys).mean()), majority, len(yt), len(ys), d.num_classes


def distill_run(name: str, csv: Path, seed: int, work: Path) -> dict:
    from distill.recipe import validate_recipe
    from distill.runner import run_recipe

    raw = {"name": f"{name}-s{seed}", "output_dir": str(work / "runs"), "seed": seed,
           "data": {"dataset": "table", "path": str(csv), "label_column": "label"}}
    results, _ = run_recipe(validate_recipe(raw), progress=False)
    return results


def spread(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work-dir", default="/tmp/table-defaults")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "table_defaults"))
    a = p.parse_args()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows, raw = [], {}
    for name, df in tables().items():
        csv = work / f"{name}.csv"
        df.to_csv(csv, index=False)
        lr, majority, n_train, n_test, classes = logistic_regression(csv)
        scores = {"teacher": [], "scratch": [], "student": []}
        epochs, warnings = {}, set()
        for seed in a.seeds:
            print(f"{name} seed {seed} ...", file=sys.stderr, flush=True)
            results = distill_run(name, csv, seed, work)
            for role in scores:
                scores[role].append(results["models"][role]["accuracy"])
                epochs[role] = results["models"][role]["epochs"]
            warnings.update(results.get("warnings", []))
        raw[name] = {"lr": lr, "majority": majority, "train_rows": n_train, "test_rows": n_test, "classes": classes,
                     "features": df.shape[1] - 1, "scores": scores, "epochs": epochs, "warnings": sorted(warnings)}
        rows.append(f"| {name} | {n_train} / {n_test} | {df.shape[1] - 1} | {classes} | {100 * majority:.1f} | "
                    f"{100 * lr:.1f} | {spread(scores['teacher'])} | {spread(scores['scratch'])} | "
                    f"{spread(scores['student'])} | {epochs['teacher']} / {epochs['student']} | {len(warnings)} |")
    head = ("| table | train / test rows | features | classes | majority | logistic regression | teacher | scratch | "
            "student (KD) | epochs teacher / student | warnings |\n|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = head + "\n" + "\n".join(rows)
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"seeds": a.seeds, "tables": raw}, indent=1) + "\n")
    out.with_suffix(".md").write_text(f"`python bench/table_defaults.py --seeds {' '.join(map(str, a.seeds))}` "
                                      f"(test accuracy in %, mean ± std over seeds)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
