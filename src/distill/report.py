"""Measuring models (parameters, size in MB = 10^6 bytes, latency, throughput) and writing
results.json / report.md. Plots live in plots.py."""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from torch import Tensor, nn

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


def _median_forward_seconds(model: nn.Module, example: Tensor, batch_size: int, warmup: int, repeats: int) -> float:
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
    return statistics.median(times)


@torch.inference_mode()
def measure_latency(model: nn.Module, example: Tensor, *, batch_size: int = 1, warmup: int = 5, repeats: int = 30) -> float:
    """Median wall time in milliseconds of one forward on a batch of `batch_size` copies of `example`
    (a tensor without batch dim, or a function batch_size -> inputs), model in eval mode, time.perf_counter. Restores the training flags."""
    return _median_forward_seconds(model, example, batch_size, warmup, repeats) * 1e3


@torch.inference_mode()
def measure_throughput(model: nn.Module, example: Tensor, *, batch_size: int = 256, warmup: int = 2, repeats: int = 10) -> float:
    """Samples per second at `batch_size` (batch size / median forward time)."""
    return batch_size / _median_forward_seconds(model, example, batch_size, warmup, repeats)


def model_card(model: nn.Module, example: Tensor, *, latency_batch: int = 1, throughput_batch: int = 256, repeats: int = 30) -> dict:
    """params, sizes (MB fp32/fp16), latency in ms per sample at `latency_batch`, throughput in samples/s."""
    latency = measure_latency(model, example, batch_size=latency_batch, repeats=repeats)
    return {
        "params": count_parameters(model),
        "size_mb_fp32": size_mb(model, 4),
        "size_mb_fp16": size_mb(model, 2),
        "latency_ms": latency / latency_batch,
        "throughput_per_s": measure_throughput(model, example, batch_size=throughput_batch, repeats=max(3, repeats // 3)),
    }


# ----------------------------------------------------------------------------- results helpers
def _teacher_first(d: dict) -> dict:
    return {**({"teacher": d["teacher"]} if "teacher" in d else {}), **d}


def ordered_models(results: dict) -> dict:
    """results["models"] with "teacher" first, the other roles in insertion order (non-dict entries as {})."""
    models = results.get("models")
    models = _teacher_first(models) if isinstance(models, dict) else {}
    return {r: (m if isinstance(m, dict) else {}) for r, m in models.items()}


def _num(x) -> float | None:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


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


def _fmt(x, spec: str, small: int | None = None) -> str:
    x = _num(x)
    if x is None:
        return "-"
    tiny = small is not None and x != 0 and abs(x) < 10 ** -small
    return f"{x:.2g}" if tiny else format(x, spec)  # tiny values stay readable instead of 0.000


def _measurement(results: dict) -> dict:
    """Settings used by model_card: results["measurement"], else the recipe's config["report"], else defaults."""
    cfg = results.get("config") if isinstance(results.get("config"), dict) else {}
    given = [results.get("measurement"), cfg.get("report")]
    return {**MEASURE_DEFAULTS, **next((m for m in given if isinstance(m, dict)), {})}


def _table(results: dict) -> tuple[list[str], list[list[str]]]:
    models = ordered_models(results)
    kind, label = quality_kind(models)
    meas = _measurement(results)
    teacher = models.get("teacher", {})
    headers = ["model", "params (M)", "size MB fp32", "size MB fp16", label, "test errors",
               f"latency ms/sample (batch {meas['latency_batch']})",
               f"throughput samples/s (batch {meas['throughput_batch']})", "speed-up ×", "compression ×", "train s"]
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
            _fmt(m.get("latency_ms"), ".3f", small=3),
            _fmt(m.get("throughput_per_s"), ",.0f"),
            _fmt(_ratio(teacher.get("latency_ms"), m.get("latency_ms")), ".1f"),
            _fmt(_ratio(teacher.get("params"), m.get("params")), ".1f"),
            _fmt(m.get("train_seconds"), ".1f"),
        ])
    return headers, rows


def format_table(results: dict) -> str:
    """The report.md table as aligned plain text for the terminal."""
    headers, rows = _table(results)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def _markdown_table(results: dict) -> str:
    headers, rows = _table(results)
    esc = lambda c: c.replace("|", "\\|")
    out = ["| " + " | ".join(map(esc, headers)) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(out)


def distillation_summary(results: dict) -> str | None:
    """The "what distillation bought" sentence(s); None unless both scratch and student exist."""
    models = ordered_models(results)
    if "student" not in models or "scratch" not in models:
        return None
    s, b, t = models["student"], models["scratch"], models.get("teacher")
    kind, _ = quality_kind(models)
    se, be = _num(s.get("errors")), _num(b.get("errors"))
    sq, bq = quality_of(s, kind), quality_of(b, kind)
    verdict = ""
    if se is not None and be is not None:
        se, be = int(se), int(be)
        how = f"{be - se} fewer" if se < be else f"{se - be} more" if se > be else "as many"
        head = (f"The distilled student makes {how} test errors {'as' if se == be else 'than'} the same network "
                f"trained alone ({se} vs {be})")
        verdict = "" if se < be else " Distillation did not reduce test errors on this run."
    elif sq is not None and bq is not None:
        f = (lambda v: f"{v * 100:.2f}%") if kind == "accuracy" else (lambda v: f"{v:.4g}")
        head = f"The distilled student scores {f(sq)} {kind} against {f(bq)} for the same network trained alone"
    else:
        head = "The student and the network trained alone have no comparable test score"
    clauses = []
    if t:
        tq, k = quality_of(t, kind), _ratio(t.get("params"), s.get("params"))
        frac = None if k is None else (f"1/{k:.0f} of" if k >= 10 else f"1/{k:.1f} of" if k >= 1 else f"{1 / k:.1f}×")
        if kind in ("accuracy", "entity_f1") and sq is not None and tq:  # scores where a share of the teacher's reads
            clauses.append(f"keeps {sq / tq * 100:.1f}% of the teacher's {kind.replace('_', ' ')}" + (f" at {frac} its parameters" if frac else ""))
        elif frac:
            clauses.append(f"has {frac} the teacher's parameters")
        sp = _ratio(t.get("latency_ms"), s.get("latency_ms"))
        if sp is not None:
            clauses.append(f"runs {sp:.1f}× faster" if sp >= 1 else f"runs {1 / sp:.1f}× slower than the teacher")
    tail = ", ".join(clauses[:-1]) + " and " + clauses[-1] if len(clauses) > 1 else "".join(clauses)
    return head + (f", {tail}." if tail else ".") + verdict


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
        cells = [f"{m['omitted_class_errors'][c]['errors']} / {m['omitted_class_errors'][c]['n']}" for c in classes]
        bias = m.get("bias_correction")
        out.append(f"| {role} | " + " | ".join(cells) + f" | {m.get('errors', '-')} | {'-' if bias is None else f'{bias:.2f}'} |")
    return out + [""]


# ----------------------------------------------------------------------------- writing
def _atomic_write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
    """results.json (indent 2, atomic); models ordered teacher first, then insertion order."""
    data = dict(results)
    if isinstance(results.get("models"), dict):
        data["models"] = _teacher_first(results["models"])
    text = json.dumps(_jsonable(data), indent=2, ensure_ascii=False) + "\n"
    return _atomic_write_text(Path(run_dir) / "results.json", text)


def write_report(run_dir, results: dict, histories: dict[str, list[dict]]) -> Path:
    """report.md plus curves.png / accuracy_vs_size.png (when there is data); returns the report path."""
    from distill import plots  # lazy: importing report must not pull in matplotlib

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    images = [("Training curves", plots.plot_training_curves(histories or {}, run_dir / "curves.png")),
              ("Accuracy vs size", plots.plot_accuracy_vs_size(results, run_dir / "accuracy_vs_size.png"))]
    get = lambda k: str(results.get(k)) if results.get(k) is not None else "-"
    meas = _measurement(results)
    lines = [f"# Distillation report: {get('recipe')}", "",
             f"Dataset: **{get('dataset')}** · task: **{get('task')}**", "", "## Results", "",
             _markdown_table(results), "",
             "Speed-up = teacher latency / model latency; compression = teacher parameters / model parameters. "
             "Sizes are the weights at that precision in MB (10^6 bytes). \"-\" means not measured.", ""]
    summary = distillation_summary(results)
    lines += ["## What distillation bought", "",
              summary or "Not computed: the run needs both a `student` and a `scratch` model (same network trained "
                         "without the teacher) to tell what distillation added.", ""]
    lines += omitted_classes_section(results)
    shown = [(title, p) for title, p in images if p is not None]
    if shown:
        lines += ["## Plots", ""] + [f"![{title}]({Path(p).name})\n" for title, p in shown]
    lines += ["## How speed was measured", "",
              f"Latency: median wall time (time.perf_counter) of one forward pass at batch size "
              f"{meas['latency_batch']}, divided by the batch size, over {meas['repeats']} repeats after "
              f"{meas['warmup']} warm-up passes, model in eval mode under torch.inference_mode. "
              f"Throughput: samples per second at batch size {meas['throughput_batch']}, "
              f"median of {max(3, meas['repeats'] // 3)} repeats. "
              f"Device: {meas.get('device', 'CPU')}, CPU threads = {torch.get_num_threads()} (torch.get_num_threads()).", ""]
    return _atomic_write_text(run_dir / "report.md", "\n".join(lines))
