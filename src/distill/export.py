"""`distill export RUN --format onnx|torchscript [--quantize int8]`: ship a trained model, with proof that it works.

The model is rebuilt from the run (or from one saved model, as `distill eval` takes it), written as ONNX or
TorchScript (export_formats.py) under a temporary name beside its destination, run on test inputs and compared
with PyTorch (export_check.py), scored on the whole test split through the exported runtime, timed beside PyTorch,
and only then renamed into place. A run's results.json gets the measurements under "exports" and its report.md is
rendered again. Nothing is written when a check or a refusal stops the export.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from distill.durable import AtomicTarget, check_sealed, file_sha256, read_checked_json, seal
from distill.data.arrays import gather
from distill.errors import UserError
from distill.report import measurement_settings
from distill.export_check import CHECK_ROWS, TOLERANCE, check_batches, format_entry, logit_difference, paired_latency
from distill.export_formats import (check_options, default_output, load_exported, model_kind, runtime_name,
                                    usual_permissions, writable_folder, write_export)

TRACE_ROWS = 8  # rows of the example the exporters trace; the check then runs other batch sizes and lengths
LATENCY_BATCH = 1  # latency per example, one at a time, as an application serving requests sees it


def find_model(path: str, role: str) -> tuple[str, Path | None, dict]:
    """(the saved model of `role`, the run folder, its results) for a finished run; (path, None, {}) for a model."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path} does not exist: give a finished run folder (runs/NAME) or a saved model "
                        "(.safetensors, or a text model's folder)")
    if not p.is_dir() or (p / "distill.json").is_file():
        return str(p), None, {}  # one saved model, as `distill eval` takes it
    if not (p / "results.json").is_file():
        raise UserError(f"{path} is neither a finished run (no results.json) nor a text model folder "
                        "(no distill.json): give runs/NAME of a completed run")
    results = read_results(p)
    roles = list(results.get("models") or {})
    if role not in roles:
        raise UserError(f"run {path} has no {role!r} model (it has {', '.join(roles) or 'none'}): choose one with --role")
    from distill.recipe import load_recipe
    from distill.tasks import make_task

    saved = p / make_task(load_recipe(p / "recipe.yaml")).saved_name(role)
    if not saved.exists():
        raise UserError(f"run {path} has no saved {role} model ({saved.name} is missing; a role computed at the end "
                        "of a run, such as student+bias, is not saved): export a saved role")
    return str(saved), p, results


def read_results(run: Path) -> dict:
    """results.json of a finished run, its sha256 checked (runs from before it had one are read as they are)."""
    return read_checked_json(run / "results.json", "rerun the experiment", required=False)


def export(path: str, *, role: str = "student", fmt: str = "onnx", quantize: str | None = None, out: str | None = None,
           data_dir: str | None = None, overrides=()) -> tuple[dict, Path, str]:
    """Export, check and measure one model; returns (its "exports" entry, the file written, the printed table)."""
    check_options(fmt, quantize)
    model_path, run, results = find_model(path, role)
    target = default_output(run or Path(model_path), role, run is not None, fmt, quantize)
    if out:  # a file, or a folder (existing, or written with a trailing /) that gets the default name
        target = Path(out) / target.name if Path(out).is_dir() or out.endswith(("/", os.sep)) else Path(out)
    made = writable_folder(target.parent)
    try:
        with AtomicTarget(target) as tmp:  # renamed into place only if the block passes; deleted otherwise
            entry, notes = _export_checked(model_path, fmt, quantize, tmp, data_dir, overrides, measurement_settings(results))
            usual_permissions(tmp)
    except BaseException:
        if made and not any(target.parent.iterdir()):
            target.parent.rmdir()  # the export/ folder made for this file
        raise
    entry = {"role": role if run else Path(model_path).stem, "format": fmt, "file": _relative(target, run),
             "quantization": quantize, "runtime": runtime_name(fmt), "size_mb": target.stat().st_size / 1e6,
             "sha256": file_sha256(target), **entry}
    table = f"{format_entry(entry, **notes)}\n\nwritten: {target}"
    if run:
        record_export(run, entry)
        table += f"\nrecorded in {run / 'results.json'} (\"exports\") and {run / 'report.md'}"
    return entry, target, table


def _export_checked(model_path, fmt, quantize, tmp: Path, data_dir, overrides, meas: dict) -> tuple[dict, dict]:
    """Write the file at `tmp`, check it against PyTorch, score and time it: (measurements, how they were taken)."""
    import torch

    from distill.saved import load_saved

    model, task, data = load_saved(model_path, overrides, data_dir)
    test, kind = data.test, model_kind(model)
    example = gather(test, list(range(min(TRACE_ROWS, len(test)))))[0]
    write_export(model, example, tmp, fmt, quantize)
    try:
        exported = load_exported(tmp, fmt, example)
        diff, ok = logit_difference(model, exported, check_batches(test))
    except Exception as e:  # e.g. a graph that cannot run other shapes than the traced one
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"the {fmt} export of {kind} does not run on the test batches ({reason}): "
                        "nothing written") from None
    if not math.isfinite(diff) or (not quantize and not ok):
        raise UserError(f"the {fmt} export of {kind} gives logits up to {diff:.3g} away from PyTorch's on "
                        f"{min(len(test), CHECK_ROWS)} test examples (allowed: {TOLERANCE:g} + {TOLERANCE:g}·|logit|): "
                        "nothing written")
    one = task.latency_inputs(data, LATENCY_BATCH)
    latency, latency_pytorch = paired_latency(lambda: model(one), _caller(exported, fmt, one), warmup=meas["warmup"],
                                              repeats=meas["repeats"])
    entry = {"max_abs_diff": diff, "tolerance": None if quantize else TOLERANCE, "metric": task.metric,
             "score": task.evaluate(exported, test)["score"], "score_pytorch": task.evaluate(model, test)["score"],
             "latency_ms": latency, "latency_ms_pytorch": latency_pytorch, "latency_batch": LATENCY_BATCH}
    return entry, {"checked": min(len(test), CHECK_ROWS), "threads": torch.get_num_threads(), "repeats": meas["repeats"]}


def _caller(exported, fmt: str, inputs):
    """The exported model's forward on `inputs`, as an application would call it (onnxruntime: numpy arrays in)."""
    if fmt == "onnx":
        feed = exported.feed(inputs)
        return lambda: exported.session.run(None, feed)
    return lambda: exported(inputs)


def _relative(target: Path, run: Path | None) -> str:
    """The file relative to the run when it lies inside it (export/student.onnx), else its absolute path."""
    target = target.resolve()
    if run is not None and target.is_relative_to(run.resolve()):
        return target.relative_to(run.resolve()).as_posix()
    return str(target)


def record_export(run: Path, entry: dict) -> None:
    """Put `entry` in results["exports"] (in place of one with the same role, format and quantization) and render
    report.md again, from the results and history as they are on disk now."""
    from distill.report import write_report, write_results

    results = read_results(run)
    key = lambda e: (e.get("role"), e.get("format"), e.get("quantization"))  # noqa: E731
    exports = [e for e in results.get("exports") or [] if isinstance(e, dict)]
    same = [i for i, e in enumerate(exports) if key(e) == key(entry)]
    if same:
        exports[same[0]] = entry
        exports = [e for i, e in enumerate(exports) if i not in same[1:]]
    else:
        exports.append(entry)
    results["exports"] = exports
    history = run / "history.json"
    check_sealed(run, "rerun the experiment", [history.name])  # (export never rewrites it: its entry stays valid)
    histories = json.loads(history.read_text()) if history.is_file() else {}
    write_results(run, results)
    write_report(run, results, histories)
    seal(run)  # SHA256SUMS again: results.json, report.md and the export changed
