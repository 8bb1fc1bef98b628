"""Measuring models (parameters, size in MB = 10^6 bytes, latency, throughput) and writing
results.json / report.md. Plots live in plots.py."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from torch import Tensor, nn

from distill.durable import atomic_write_text, checked_json
from distill.report_sections import (exports_section, language_model_section, setup_section, translation_section,
                                     warnings_list, warnings_section)
from distill.report_text import NOISE_RULE, fmt as _fmt, fmt_spread, noise_sentence, num as _num, plural, size_phrase, speed_phrase

MEASURE_DEFAULTS = {"latency_batch": 1, "throughput_batch": 256, "repeats": 30, "warmup": 5}


# ----------------------------------------------------------------------------- measuring
def count_parameters(model: nn.Module) -> int:
    """Number of parameter values (not buffers); a parameter shared by several modules counts once."""
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates shared tensors


def size_mb(model: nn.Module, bytes_per_value: int) -> float:
    """Size of the weights at a given precision, in MB (10^6 bytes).

    (parameters + floating buffers) * bytes_per_value; non-floating buffers (e.g. BatchNorm's int64
    num_batches_tracked) count at their own itemsize, since casting a model leaves them alone.
    """
    total = sum(p.numel() for p in model.parameters()) * bytes_per_value
    for b in model.buffers():  # buffers() de-duplicates too
        total += b.numel() * (bytes_per_value if b.is_floating_point() else b.element_size())
    return total / 1e6


def _forward_seconds(model: nn.Module, example: Tensor, batch_size: int, warmup: int, repeats: int) -> list[float]:
    """Wall time of each of `repeats` forwards (after `warmup` untimed ones), in seconds."""
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch_size and repeats must be >= 1 and warmup >= 0, got {batch_size}, {repeats}, {warmup}")
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    if callable(example):  # a task's inputs (e.g. a dict of token ids) for `batch_size` copies of one example
        batch = send_to_device(example(batch_size), device)
    else:
        batch = example.unsqueeze(0).expand(batch_size, *example.shape).contiguous().to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for _ in range(warmup):
            model(batch)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(batch)
            sync()
            times.append(time.perf_counter() - start)
    finally:
        for m, flag in flags.items():
            m.training = flag
    return times


@torch.inference_mode()
def measure_latency(model: nn.Module, example: Tensor, *, batch_size: int = 1, warmup: int = 5, repeats: int = 30) -> float:
    """Median wall time in milliseconds of one forward on a batch of `batch_size` copies of `example`
    (a tensor without batch dim, or a function batch_size -> inputs), model in eval mode, time.perf_counter. Restores the training flags."""
    return statistics.median(_forward_seconds(model, example, batch_size, warmup, repeats)) * 1e3


@torch.inference_mode()
def measure_throughput(model: nn.Module, example: Tensor, *, batch_size: int = 256, warmup: int = 2, repeats: int = 10) -> float:
    """Samples per second at `batch_size` (batch size / median forward time)."""
    return batch_size / statistics.median(_forward_seconds(model, example, batch_size, warmup, repeats))


def throughput_repeats(repeats: int) -> int:
    """Throughput repeats for `repeats` latency repeats: a third of them (big batches take longer), at least 5
    so that min and max mean something."""
    return max(5, repeats // 3)


def model_card(model: nn.Module, example: Tensor, *, latency_batch: int = 1, throughput_batch: int = 256, repeats: int = 30) -> dict:
    """params, sizes (MB fp32/fp16), latency in ms per sample at `latency_batch` and throughput in samples/s:
    medians over the repeats (latency_ms, throughput_per_s) and their range (*_min, *_max)."""
    with torch.inference_mode():
        lat = sorted(t * 1e3 / latency_batch for t in _forward_seconds(model, example, latency_batch, 5, repeats))
        thr = sorted(throughput_batch / t for t in _forward_seconds(model, example, throughput_batch, 2, throughput_repeats(repeats)))
    return {
        "params": count_parameters(model),
        "size_mb_fp32": size_mb(model, 4),
        "size_mb_fp16": size_mb(model, 2),
        "latency_ms": statistics.median(lat), "latency_ms_min": lat[0], "latency_ms_max": lat[-1],
        "throughput_per_s": statistics.median(thr), "throughput_per_s_min": thr[0], "throughput_per_s_max": thr[-1],
    }


# ----------------------------------------------------------------------------- results helpers
def _teacher_first(d: dict) -> dict:
    return {**({"teacher": d["teacher"]} if "teacher" in d else {}), **d}


def ordered_models(results: dict) -> dict:
    """results["models"] with "teacher" first, the other roles in insertion order (non-dict entries as {})."""
    models = results.get("models")
    models = _teacher_first(models) if isinstance(models, dict) else {}
    return {r: (m if isinstance(m, dict) else {}) for r, m in models.items()}


def quality_kind(models: dict) -> tuple[str, str]:
    """(metric, column label): accuracy shown in % if any model has it, else the first metric name."""
    if any("accuracy" in m or m.get("metric") == "accuracy" for m in models.values()):
        return "accuracy", "accuracy (%)"
    metric = next((m["metric"] for m in models.values() if isinstance(m.get("metric"), str)), None)
    return (metric, metric) if metric else ("accuracy", "accuracy (%)")


def quality_of(m: dict, kind: str) -> float | None:
    if kind == "accuracy":
        v = _num(m.get("accuracy"))
        return v if v is not None or m.get("metric") != "accuracy" else _num(m.get("score"))
    return _num(m.get("score")) if m.get("metric") == kind else None


def _ratio(a, b) -> float | None:
    a, b = _num(a), _num(b)
    return a / b if a is not None and b is not None and b > 0 else None


def measurement_settings(results: dict) -> dict:
    """Settings used by model_card: results["measurement"], else the recipe's config["report"], else defaults."""
    cfg = results.get("config") if isinstance(results.get("config"), dict) else {}
    given = [results.get("measurement"), cfg.get("report")]
    return {**MEASURE_DEFAULTS, **next((m for m in given if isinstance(m, dict)), {})}


def _table(results: dict) -> tuple[list[str], list[list[str]]]:
    models = ordered_models(results)
    kind, label = quality_kind(models)
    meas = measurement_settings(results)
    teacher = models.get("teacher", {})
    headers = ["model", "params (M)", "size MB fp32", "size MB fp16", label, "test errors",
               f"latency ms/sample (batch {meas['latency_batch']})\nmedian (min–max)",
               f"throughput samples/s (batch {meas['throughput_batch']})\nmedian (min–max)", "speed-up ×", "compression ×", "train s"]
    rows = []
    for role, m in models.items():
        q, params, errors = quality_of(m, kind), _num(m.get("params")), _num(m.get("errors"))
        rows.append([
            str(role),
            _fmt(None if params is None else params / 1e6, ".3f", small=3),
            _fmt(m.get("size_mb_fp32"), ".3f", small=3),
            _fmt(m.get("size_mb_fp16"), ".3f", small=3),
            _fmt(None if q is None else q * 100, ".2f") if kind == "accuracy" else _fmt(q, ".4g"),
            "-" if errors is None else str(int(errors)),
            fmt_spread(m.get("latency_ms"), m.get("latency_ms_min"), m.get("latency_ms_max"), ".3f", small=3),
            fmt_spread(m.get("throughput_per_s"), m.get("throughput_per_s_min"), m.get("throughput_per_s_max"), ",.0f"),
            _fmt(_ratio(teacher.get("latency_ms"), m.get("latency_ms")), ".1f"),
            _fmt(_ratio(teacher.get("params"), m.get("params")), ".1f"),
            _fmt(m.get("train_seconds"), ".1f"),
        ])
    return headers, rows


def format_table(results: dict) -> str:
    """The report.md table as aligned plain text for the terminal, then one "warning: ..." line per warning."""
    headers, rows = _table(results)
    head = [[h.split("\n")[0] for h in headers], [(h.split("\n") + [""])[1] for h in headers]]  # long headers on two lines
    widths = [max(len(r[i]) for r in [*head, *rows]) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    warnings = ["", *(f"warning: {w}" for w in warnings_list(results))] if warnings_list(results) else []
    return "\n".join([*map(line, head), "  ".join("-" * w for w in widths), *map(line, rows), *warnings])


def _markdown_table(results: dict) -> str:
    headers, rows = _table(results)
    esc = lambda c: c.replace("|", "\\|").replace("\n", ", ")
    out = ["| " + " | ".join(map(esc, headers)) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(out)


def _head(s: dict, b: dict, kind: str) -> tuple[str, str]:
    """The student-vs-scratch sentence and its verdict."""
    se, be = _num(s.get("errors")), _num(b.get("errors"))
    sq, bq = quality_of(s, kind), quality_of(b, kind)
    if se is not None and be is not None:
        se, be = int(se), int(be)
        diff = "as many test errors as" if se == be else plural(abs(se - be), f"{'fewer' if se < be else 'more'} test error") + " than"
        verdict = "" if se < be else " Distillation did not reduce test errors on this run."
        return f"The distilled student makes {diff} the same network trained alone ({se} vs {be})", verdict
    if sq is not None and bq is not None:
        f = (lambda v: f"{v * 100:.2f}%") if kind == "accuracy" else (lambda v: f"{v:.4g}")
        return f"The distilled student scores {f(sq)} {kind.replace('_', ' ')} against {f(bq)} for the same network trained alone", ""
    return "The student and the network trained alone have no comparable test score", ""


def _teacher_clauses(s: dict, t: dict, kind: str) -> list[str]:
    """What the student keeps of the teacher, at what size and speed."""
    sq, tq = quality_of(s, kind), quality_of(t, kind)
    k = _ratio(t.get("params"), s.get("params"))
    clauses = []
    if kind in ("accuracy", "entity_f1") and sq is not None and tq:  # scores where a share of the teacher's reads
        size = size_phrase(k)
        clauses.append(f"keeps {sq / tq * 100:.1f}% of the teacher's {kind.replace('_', ' ')}" + (f" {size}" if size else ""))
    elif size_phrase(k, alone=True):
        clauses.append(size_phrase(k, alone=True))
    speed = speed_phrase(_ratio(t.get("latency_ms"), s.get("latency_ms")))
    if speed:
        sr, tr = [(_num(m.get("latency_ms_min")), _num(m.get("latency_ms_max"))) for m in (s, t)]
        overlap = None not in (*sr, *tr) and sr[0] <= tr[1] and tr[0] <= sr[1]
        clauses.append(speed + (" (their latency ranges overlap: within timing noise)" if overlap and "about" not in speed else ""))
    return clauses


def _noise_lines(results: dict, models: dict, kind: str) -> list[str]:
    """One sentence per comparison (student vs scratch, vs teacher) on whether the difference is within noise."""
    seeds = results.get("seeds") if isinstance(results.get("seeds"), dict) else {}
    score = lambda m: {"score": quality_of(m, kind), "n": m.get("test_size")}  # noqa: E731
    out = []
    for role, label in (("scratch", "the network trained alone"), ("teacher", "the teacher")):
        if role in models:
            paired = (seeds["student"], seeds[role]) if isinstance(seeds.get("student"), list) and isinstance(seeds.get(role), list) else None
            line = noise_sentence(label, kind, score(models["student"]), score(models[role]), paired)
            out += [line] if line else []
    return out


def distillation_summary(results: dict) -> str | None:
    """The "what distillation bought" sentences; None unless both scratch and student exist.

    Then one line per comparison (against scratch, against the teacher) saying whether the difference in the
    test metric is within noise: the spread over seeds when results["seeds"] = {role: [test score per seed]}
    (same seeds, same order) holds two or more, else for accuracy a 95% band from the test-set size
    (report_text.accuracy_band), else "not estimated". The rule is stated in the report (NOISE_RULE)."""
    models = ordered_models(results)
    if "student" not in models or "scratch" not in models:
        return None
    s, t = models["student"], models.get("teacher")
    kind, _ = quality_kind(models)
    head, verdict = _head(s, models["scratch"], kind)
    clauses = _teacher_clauses(s, t, kind) if t else []
    tail = ", ".join(clauses[:-1]) + " and " + clauses[-1] if len(clauses) > 1 else "".join(clauses)
    text = head + (f", {tail}." if tail else ".") + verdict
    noise = _noise_lines(results, models, kind)
    return text + ("\n\n" + " ".join(noise) if noise else "")


def omitted_classes_section(results: dict) -> list[str]:
    """Errors on the classes left out of the students' rows (Hinton's omitted 3), per role; [] if none."""
    models = {r: m for r, m in ordered_models(results).items() if isinstance(m.get("omitted_class_errors"), dict)}
    if not models:
        return []
    classes = list(next(iter(models.values()))["omitted_class_errors"])
    out = ["## Classes left out of the transfer set", "",
           "The students never saw a row of these classes; only the teacher's soft targets tell of them. "
           "`student+bias` is the distilled student with those classes' logits raised by the bias shown.", "",
           "| model | " + " | ".join(f"errors on class {c}" for c in classes) + " | all test errors | bias |",
           "|:---|" + "---:|" * (len(classes) + 2)]
    for role, m in models.items():
        per_class = [m["omitted_class_errors"].get(c) if isinstance(m["omitted_class_errors"].get(c), dict) else {} for c in classes]
        cells = [f"{_fmt(e.get('errors'), '.0f')} / {_fmt(e.get('n'), '.0f')}" for e in per_class]
        out.append(f"| {role} | " + " | ".join(cells) + f" | {_fmt(m.get('errors'), '.0f')} | {_fmt(m.get('bias_correction'), '.2f')} |")
    return out + [""]


# ----------------------------------------------------------------------------- writing
def _atomic_write_text(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None  # NaN/inf are not valid JSON
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return _jsonable(x.tolist()) if hasattr(x, "tolist") else str(x)  # tensors/numpy; Path etc. as text


def write_results(run_dir, results: dict) -> Path:
    """results.json (indent 2, atomic, checksummed); models ordered teacher first, then insertion order."""
    data = dict(results)
    if isinstance(results.get("models"), dict):
        data["models"] = _teacher_first(results["models"])
    # with a "sha256" of its content, which `distill export` checks before it adds to the file
    return _atomic_write_text(Path(run_dir) / "results.json", checked_json(json.loads(strict_json(data)), indent=2,
                                                                           ensure_ascii=False, allow_nan=False))


def strict_json(data, indent: int | None = 2) -> str:
    """JSON text with NaN/inf written as null (json.dumps would write NaN, which is not JSON), tensors and
    numpy values as numbers, other objects as text; ends with a newline."""
    return json.dumps(_jsonable(data), indent=indent, ensure_ascii=False, allow_nan=False) + "\n"


def _speed_text(meas: dict) -> list[str]:
    return ["## How speed was measured", "",
            f"Latency: wall time (time.perf_counter) of one forward pass at batch size {meas['latency_batch']}, divided "
            f"by the batch size, over {meas['repeats']} repeats after {meas['warmup']} warm-up passes, model in eval "
            f"mode under torch.inference_mode; the table gives the median and, in brackets, the fastest and slowest "
            f"repeat. Throughput: samples per second at batch size {meas['throughput_batch']} over "
            f"{throughput_repeats(meas['repeats'])} repeats after 2 warm-up passes (median, min–max). "
            f"Device: {meas.get('device', 'CPU')}, CPU threads = {torch.get_num_threads()} (torch.get_num_threads()). "
            "On a shared machine the slowest repeats show other work; compare medians, and read ranges that "
            "overlap as no measured difference.", ""]


def write_report(run_dir, results: dict, histories: dict[str, list[dict]]) -> Path:
    """report.md plus curves.png / accuracy_vs_size.png (when there is data); returns the report path."""
    from distill import plots  # lazy: importing report must not pull in matplotlib

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    images = [("Training curves", plots.plot_training_curves(histories or {}, run_dir / "curves.png")),
              ("Accuracy vs size", plots.plot_accuracy_vs_size(results, run_dir / "accuracy_vs_size.png"))]
    get = lambda k: str(results.get(k)) if results.get(k) is not None else "-"
    models = ordered_models(results)
    lines = [f"# Distillation report: {get('recipe')}", "", *warnings_section(results),
             f"Dataset: **{get('dataset')}** · task: **{get('task')}**", "", *setup_section(results, models),
             "## Results", "", _markdown_table(results), "",
             "Speed-up = teacher latency / model latency (medians); compression = teacher parameters / model "
             "parameters. Sizes are the weights at that precision in MB (10^6 bytes). \"-\" means not measured.", ""]
    summary = distillation_summary(results)
    lines += ["## What distillation bought", "",
              summary or "Not computed: the run needs both a `student` and a `scratch` model (same network trained "
                         "without the teacher) to tell what distillation added.", ""]
    lines += [NOISE_RULE, ""] if summary else []
    lines += omitted_classes_section(results) + translation_section(results) + language_model_section(results)
    lines += exports_section(results)
    shown = [(title, p) for title, p in images if p is not None]
    if shown:
        lines += ["## Plots", ""] + [f"![{title}]({Path(p).name})\n" for title, p in shown]
    if plots.trained_without_validation(histories):
        lines += ["No validation split: the last epoch's weights were kept (no epoch was chosen on validation rows).", ""]
    lines += _speed_text(measurement_settings(results))
    return _atomic_write_text(run_dir / "report.md", "\n".join(lines))
