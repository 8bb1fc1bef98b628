"""What `distill export` measures on an exported model: agreement with PyTorch, latency beside it, and the table.

The check: on the first CHECK_ROWS test examples, in batches of CHECK_BATCH (so the batch size, and for text the
padded length, differ from the traced example's), every logit of the exported model must be within
TOLERANCE + TOLERANCE * |PyTorch logit| of PyTorch's (numpy.allclose's rule with rtol = atol = 1e-5: absolute for
logits up to 1, relative beyond, where float32 rounding grows with the value).
"""

from __future__ import annotations

import statistics
import time

import torch

from distill.data.arrays import gather
from torch import nn

TOLERANCE = 1e-5
CHECK_ROWS, CHECK_BATCH = 256, 100


def check_batches(test) -> list:
    """Inputs of the first CHECK_ROWS test examples, CHECK_BATCH at a time (text batches are padded per batch)."""
    n = min(CHECK_ROWS, len(test))
    return [gather(test, list(range(s, min(s + CHECK_BATCH, n))))[0] for s in range(0, n, CHECK_BATCH)]


def logit_difference(model: nn.Module, exported: nn.Module, batches: list) -> tuple[float, bool]:
    """(max |exported - PyTorch| over all logits, whether every logit is within the tolerance rule above).
    A shape mismatch, or a NaN where PyTorch has a number, fails."""
    worst, ok = 0.0, True
    with torch.inference_mode():
        for inputs in batches:
            ref, got = model(inputs).float(), exported(inputs).float()
            if ref.shape != got.shape:
                return float("inf"), False
            diff = (got - ref).abs()
            if diff.isnan().any():
                return float("nan"), False
            ok = ok and bool((diff <= TOLERANCE + TOLERANCE * ref.abs()).all())
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst, ok


def _stats(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"min": min(ms), "median": statistics.median(ms), "max": max(ms)}


def paired_latency(run_pytorch, run_exported, *, warmup: int, repeats: int) -> tuple[dict, dict]:
    """({min, median, max} ms of the exported model, same for PyTorch): both are called on the same batch-1 input,
    taking turns (the first one to go alternates), so a slow moment of a shared machine hits both alike."""
    timed = {"pytorch": [], "exported": []}
    calls = {"pytorch": run_pytorch, "exported": run_exported}
    with torch.inference_mode():
        for _ in range(warmup):
            run_pytorch(), run_exported()
        for i in range(repeats):
            for name in (("pytorch", "exported") if i % 2 == 0 else ("exported", "pytorch")):
                start = time.perf_counter()
                calls[name]()
                timed[name].append(time.perf_counter() - start)
    return _stats(timed["exported"]), _stats(timed["pytorch"])


def _score(x, metric: str) -> str:
    return f"{x * 100:.2f}%" if metric == "accuracy" else f"{x:.4f}"


def _latency(lat: dict) -> str:
    return f"{lat['median']:.3f} ({lat['min']:.3f}-{lat['max']:.3f})"


def format_entry(e: dict, *, checked: int, threads: int, repeats: int) -> str:
    """The exports entry as a small table, and how it was measured."""
    median, median_pytorch = e["latency_ms"]["median"], e["latency_ms_pytorch"]["median"]
    speedup = median_pytorch / median if median > 0 else float("nan")
    rule = (f"every logit within {e['tolerance']:g} + {e['tolerance']:g}·|PyTorch logit| on {checked} "
            "test examples: passed" if e["tolerance"] is not None
            else "int8: no tolerance check; the difference is reported")
    headers = ["format", "file", "MB", "max |diff|", f"{e['metric']} exported / PyTorch",
               f"latency ms b{e['latency_batch']}: {e['runtime'].split(' ')[0]}", "PyTorch", "speed-up"]
    row = [e["format"] + (f" {e['quantization']}" if e["quantization"] else ""), e["file"], f"{e['size_mb']:.3f}",
           f"{e['max_abs_diff']:.2g}", f"{_score(e['score'], e['metric'])} / {_score(e['score_pytorch'], e['metric'])}",
           _latency(e["latency_ms"]), _latency(e["latency_ms_pytorch"]), f"{speedup:.2f}x"]
    widths = [max(len(h), len(c)) for h, c in zip(headers, row)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(row), "",
                      f"check: {rule}",
                      f"runtime: {e['runtime']}; latency: median (min-max) of {repeats} forwards at batch "
                      f"{e['latency_batch']} after warm-up, PyTorch and the export taking turns, "
                      "torch threads = " + ("onnxruntime intra-op threads = " if e["format"] == "onnx" else "") + str(threads)])
