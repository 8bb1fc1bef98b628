"""`distill bench`: what a distillation epoch costs here against the plain-PyTorch limit.

Four ways to train the same student on the same rows, same batch size, same models:
  plain    a minimal hand-written KD loop (index the tensors, teacher under no_grad, KL + CE, step): the limit
  live     distill's loop (Accelerate, the kd method) with the teacher run live
  cached   distill's loop learning from a teacher-output cache (no teacher in memory)
  student  distill's loop with no teacher at all (the floor for the cached run)
Each runs in its own fresh process (spawned). Memory: the resident set size when training starts (data and
models loaded) and its peak during training (Linux resets the peak at the start through /proc/self/clear_refs;
elsewhere the peak is the process's whole-life one; on CUDA, allocated memory). Epochs after the first are
timed and the median is kept. Variants take turns round after
round so that a slow phase of a shared machine hits them all alike. The ratios are the point: absolute times
depend on the machine.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = ("plain", "live", "cached", "student")


def _setup(recipe_raw: dict, teacher_path: str | None, threads: int):
    from distill.recipe import validate_recipe
    from distill.tasks.classification import load_data, load_teacher
    from distill.students import build_model
    from distill.transfer import recipe_rows

    torch.set_num_threads(threads)
    recipe = validate_recipe(recipe_raw)
    data = load_data(recipe)
    rows = recipe_rows(recipe, data.train)[1]
    torch.manual_seed(recipe.seed)
    if teacher_path:
        teacher = load_teacher(recipe, data, teacher_path)
    else:  # speed does not depend on the weights: an untrained teacher of the recipe's architecture will do
        teacher = build_model(recipe.teacher.model, data.input_shape, data.num_classes)
    student = build_model(recipe.student.model, data.input_shape, data.num_classes)
    return recipe, rows, teacher.eval(), student


def plain_kd_epoch(teacher, student, optimizer, x, y, batch_size: int, temperature: float, generator) -> float:
    """One epoch of the hand-written loop; returns its seconds. The same loss as the kd method's defaults:
    0.1·CE(s, y) + 0.9·T²·KL(softmax(t/T) || softmax(s/T)), batchmean."""
    t0 = time.perf_counter()
    perm = torch.randperm(len(y), generator=generator)
    for i in range(0, len(y), batch_size):
        idx = perm[i : i + batch_size]
        xb, yb = x[idx], y[idx]
        with torch.no_grad():
            t = teacher(xb)
        s = student(xb)
        soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                        reduction="batchmean", log_target=True) * temperature**2
        loss = 0.1 * F.cross_entropy(s, yb) + 0.9 * soft
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t0


def _status_mb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in MB; None elsewhere."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 / 1e6 if match else None


def _start_memory() -> float:
    """Memory in use as training starts (MB); from here on the peak counts training only (where resettable)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 1e6
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set size (VmHWM)
    except OSError:
        pass
    return _status_mb("VmRSS") or 0.0


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e6
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def run_variant(variant: str, recipe_raw: dict, teacher_path: str | None, cache_dir: str | None,
                epochs: int, threads: int) -> dict:
    """Train `epochs` epochs one way in this process; {"epoch_seconds": [...], "start_mb": x, "peak_mb": y}."""
    from distill.methods.kd import KD, KDConfig
    from distill.methods.supervised import Supervised, SupervisedConfig
    from distill.signals import CachedDataset, CachedTeacher, LiveTeacher, open_cache
    from distill.train import fit, make_accelerator, make_optimizer

    recipe, rows, teacher, student = _setup(recipe_raw, teacher_path, threads)
    cfg = recipe.student.train.model_copy(update={"epochs": epochs, "jitter": 0, "patience": None})
    temperature = getattr(recipe.distill, "temperature", 4.0)
    if variant == "plain":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        teacher, student = teacher.to(device), student.to(device)
        x, y = rows.x.to(device), rows.y.to(device)
        optimizer = make_optimizer(student.parameters(), cfg)
        generator = torch.Generator().manual_seed(recipe.seed)
        start = _start_memory()
        seconds = [plain_kd_epoch(teacher, student, optimizer, x, y, cfg.batch_size, temperature, generator)
                   for _ in range(epochs)]
        return {"epoch_seconds": seconds, "start_mb": start, "peak_mb": _peak_memory_mb()}
    kd = KDConfig(temperature=temperature, hard_weight=0.1, soft_weight=0.9)
    data = rows
    if variant == "live":
        method = KD(kd, LiveTeacher(teacher))
    elif variant == "cached":
        del teacher  # no teacher in memory: that is the point of the cache
        data = CachedDataset(rows, open_cache(cache_dir, dataset=rows))
        method = KD(kd, CachedTeacher())
    else:
        del teacher
        method = Supervised(SupervisedConfig())
    accelerator = make_accelerator(recipe.mixed_precision)
    start = _start_memory()
    result = fit(student, method, data, None, cfg, seed=recipe.seed, accelerator=accelerator, progress=False)
    return {"epoch_seconds": [row["seconds"] for row in result.history], "start_mb": start, "peak_mb": _peak_memory_mb()}


def _child(queue, run, *args):
    try:
        queue.put(run(*args))
    except BaseException as e:  # report, do not hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _in_fresh_process(*args, run=run_variant) -> dict:
    """run(*args) in a spawned process (fresh allocator and caches); its result, or a UserError on failure."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, run, *args))
    proc.start()
    out = None
    while out is None:  # a child killed by the OOM killer or a signal never reports: do not wait for it forever
        try:
            out = queue.get(timeout=5)
        except queue_module.Empty:
            if not proc.is_alive():
                out = {"error": f"the process died with exit code {proc.exitcode}"}
    proc.join()
    if "error" in out:
        from distill.errors import UserError

        raise UserError(f"bench variant {args[0]} failed: {out['error']}")
    return out


def check_counts(**counts: int | None) -> None:
    """bench's counts (epochs, rounds, threads, steps, rows, top_k) are whole numbers >= 1 when given: refused in one
    line before any model is built (0 epochs would leave nothing to time, threads -1 fails inside torch)."""
    from distill.errors import UserError

    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"bench: {name} must be a whole number >= 1, got {value!r}")


def bench(recipe, *, teacher_path: str | None = None, epochs: int = 3, rounds: int = 2, threads: int | None = None,
          top_k: int | None = None, work_dir: str | None = None, progress=print) -> dict:
    """Time every variant `rounds` times (fresh processes, `epochs` epochs each, the first epoch of each
    process not timed); write the cache first (timed, with its I/O share). Returns all figures and ratios."""
    from distill.signals import write_cache

    check_counts(epochs=epochs, rounds=rounds, threads=threads, top_k=top_k)
    threads = threads or torch.get_num_threads()
    recipe_raw = recipe.model_dump(mode="json")
    _, rows, teacher, _ = _setup(recipe_raw, teacher_path, threads)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        cache_dir = str(Path(tmp) / "cache")
        manifest = write_cache(teacher, rows, cache_dir, top_k=top_k, dtype="float32" if top_k is None else "float16")
        stats = manifest["stats"]
        progress(f"cache: {len(rows)} rows, {stats['bytes'] / 1e6:.1f} MB in {stats['total_seconds']:.1f} s "
                 f"({stats['io_seconds'] / stats['total_seconds']:.0%} I/O)")
        times = {v: [] for v in VARIANTS}
        per_round = {v: [] for v in VARIANTS}  # median timed epoch of each round
        peaks = {v: [] for v in VARIANTS}
        starts = {v: [] for v in VARIANTS}
        for r in range(rounds):
            for v in VARIANTS:
                out = _in_fresh_process(v, recipe_raw, teacher_path, cache_dir, epochs + 1, threads)
                times[v] += out["epoch_seconds"][1:]  # the first epoch warms up allocators and caches
                per_round[v].append(statistics.median(out["epoch_seconds"][1:]))
                peaks[v].append(out["peak_mb"])
                starts[v].append(out["start_mb"])
                progress(f"round {r + 1}/{rounds} {v:8s} epoch {statistics.median(out['epoch_seconds'][1:]):.3f} s, "
                         f"memory {out['start_mb']:.0f} MB at the start, peak {out['peak_mb']:.0f} MB")
    epoch = {v: statistics.median(times[v]) for v in VARIANTS}
    return {
        "rows": len(rows), "batch_size": recipe.student.train.batch_size, "threads": threads, "epochs_timed": len(times["plain"]),
        "epoch_seconds": epoch, "all_epoch_seconds": times, "peak_mb": {v: max(peaks[v]) for v in VARIANTS},
        "start_mb": {v: max(starts[v]) for v in VARIANTS},
        "cache": {"bytes": stats["bytes"], "seconds": stats["total_seconds"], "io_fraction": stats["io_seconds"] / stats["total_seconds"],
                  "teacher_fraction": stats["teacher_seconds"] / stats["total_seconds"], "top_k": top_k},
        "ratios": {name: epoch[a] / epoch[b] for name, (a, b) in RATIOS.items()},
        "rounds": rounds, "round_epoch_seconds": per_round, "ratio_spread": ratio_spread(per_round),
    }


RATIOS = {"live / plain": ("live", "plain"), "cached / student": ("cached", "student"), "cached / live": ("cached", "live")}
MIN_ROUNDS = 3  # fewer rounds give no median worth the name on a shared machine


def ratio_spread(per_round: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """min, median, max over rounds of each ratio, from each round's median epoch per variant (rounds pair
    up: the variants of one round ran back to back); {} with fewer than 2 rounds."""
    n = min(len(v) for v in per_round.values())
    if n < 2:
        return {}
    out = {}
    for name, (a, b) in RATIOS.items():
        r = sorted(per_round[a][i] / per_round[b][i] for i in range(n))
        out[name] = {"min": r[0], "median": statistics.median(r), "max": r[-1]}
    return out


def rounds_note(rounds: int) -> str | None:
    """The warning printed with fewer than MIN_ROUNDS rounds."""
    if rounds >= MIN_ROUNDS:
        return None
    said = "one round is noise" if rounds == 1 else f"{rounds} rounds give a range but no reliable median"
    return f"note: on a shared machine {said}; the ratios need --rounds {MIN_ROUNDS} or more"


def _ratio_line(name: str, value: float, spread: dict) -> str:
    if name not in spread:
        return f"{name:18s} {value:.3f}"
    lo, mid, hi = (spread[name][k] for k in ("min", "median", "max"))
    return f"{name:18s} {value:.3f}   per round: min {lo:.3f}, median {mid:.3f}, max {hi:.3f}"


def format_bench(result: dict) -> str:
    """The printed table: epoch time and memory per variant, the ratios (with their spread over rounds when
    there are 2 or more), the cache's cost, and a note when the rounds are too few for the ratios to hold."""
    e, m, s, r = result["epoch_seconds"], result["peak_mb"], result["start_mb"], result["ratios"]
    rounds = f" over {result['rounds']} round{'s' if result['rounds'] != 1 else ''}" if isinstance(result.get("rounds"), int) else ""
    lines = [f"{result['rows']} rows, batch {result['batch_size']}, {result['threads']} threads, "
             f"median of {result['epochs_timed']} timed epochs per variant{rounds}",
             "", f"{'variant':10s} {'epoch s':>9s} {'MB at start':>12s} {'peak MB':>9s}"]
    lines += [f"{v:10s} {e[v]:9.3f} {s[v]:12.0f} {m[v]:9.0f}" for v in VARIANTS]
    lines += ["", *(_ratio_line(k, v, result.get("ratio_spread") or {}) for k, v in r.items()),
              f"cache: {result['cache']['bytes'] / 1e6:.1f} MB written in {result['cache']['seconds']:.1f} s, "
              f"{result['cache']['teacher_fraction']:.0%} teacher forward, {result['cache']['io_fraction']:.0%} I/O"]
    note = rounds_note(result["rounds"]) if isinstance(result.get("rounds"), int) else None
    return "\n".join(lines + ([note] if note else []))
