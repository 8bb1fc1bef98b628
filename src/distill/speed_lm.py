"""`distill bench` on a causal-LM recipe: time per optimiser step of distilling a language model.

Variants, same rows, batches, models, optimiser and steps (`--steps`, the first few untimed):
  plain            a minimal hand-written forward-KL loop (the dataset's own batches, teacher under no_grad,
                   mean KL(p_T || p_S) over the counted tokens, backward, step): the limit
  live             distill's loop with the `divergence` method (forward KL, the recipe's chunking), teacher live
  cached           distill's loop with `topk` (rest bucket) from a `distill cache` of the teacher's top-k logits
  student          distill's loop with no teacher (the floor)
  plain-on-policy  the hand-written loop where every batch's completions are the student's own samples
  live-on-policy   distill with `divergence` on_policy: 1.0 (GKD's lambda = 1)
Each runs in a fresh process; variants take turns round after round (speed.py does the same for
classification). The ratios are the point: absolute times depend on the machine.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.speed import _in_fresh_process, _peak_memory_mb, _start_memory, rounds_note

LM_VARIANTS = ("plain", "live", "cached", "student", "plain-on-policy", "live-on-policy")
LM_RATIOS = {"live / plain": ("live", "plain"), "live-on-policy / plain-on-policy": ("live-on-policy", "plain-on-policy"),
             "cached / student": ("cached", "student"), "student / plain": ("student", "plain")}
WARMUP_STEPS = 3


def _setup(recipe_raw: dict, threads: int, rows: int | None):
    from distill.recipe import validate_recipe
    from distill.tasks import make_task

    torch.set_num_threads(threads)
    recipe = validate_recipe(recipe_raw)
    task = make_task(recipe, None)
    data = task.load_data()
    train = data.train if rows is None or rows >= len(data.train) else data.train.subset(range(rows))
    torch.manual_seed(recipe.seed)  # speed does not depend on the weights: untrained models of the recipe's shapes
    teacher = task.build_model(recipe.teacher.model, data).eval()
    student = task.build_model(recipe.student.model, data, teacher)
    return recipe, train, teacher, student


def plain_steps(teacher, student, optimizer, rows, batch_size: int, steps: int, on_policy: bool, max_new_tokens: int,
                generator) -> list[float]:
    """The hand-written loop; seconds of each step. Forward KL per counted token, mean over the batch's tokens."""
    seconds, order = [], torch.randperm(len(rows), generator=generator).tolist()
    for i in range(steps):
        t0 = time.perf_counter()
        idx = [order[(i * batch_size + j) % len(order)] for j in range(batch_size)]
        x, _ = rows.__getitems__(idx)
        if on_policy:
            student.eval()
            with torch.no_grad():
                x, _ = student.sample_completions(x, max_new_tokens=max_new_tokens, temperature=1.0)
            student.train()
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def run_lm_variant(variant: str, recipe_raw: dict, cache_dir: str | None, steps: int, threads: int, rows: int | None,
                   max_new_tokens: int) -> dict:
    """`steps` optimiser steps one way in this process: {"step_seconds": [...], "start_mb", "peak_mb"}."""
    from distill.methods.divergence import Divergence, DivergenceConfig
    from distill.methods.supervised import Supervised, SupervisedConfig
    from distill.methods.topk import TopK, TopKConfig
    from distill.signals import CachedDataset, CachedTeacher, LiveTeacher, open_cache
    from distill.train import fit, make_optimizer

    recipe, train, teacher, student = _setup(recipe_raw, threads, rows)
    cfg = recipe.student.train.model_copy(update={"max_steps": steps, "eval_every": None, "patience": None,
                                                  "warmup_epochs": 0.0, "warmup_steps": 0, "grad_accum": 1})
    on_policy = variant.endswith("on-policy")
    if variant.startswith("plain"):
        optimizer = make_optimizer(student.parameters(), cfg)
        start = _start_memory()
        seconds = plain_steps(teacher, student, optimizer, train, cfg.batch_size, steps, on_policy, max_new_tokens,
                              torch.Generator().manual_seed(recipe.seed))
        return {"step_seconds": seconds, "start_mb": start, "peak_mb": _peak_memory_mb()}
    data = train
    if variant.startswith("live"):
        chunk = getattr(recipe.distill, "chunk_size", 1024)
        method = Divergence(DivergenceConfig(chunk_size=chunk, on_policy=1.0 if on_policy else 0.0,
                                             max_new_tokens=max_new_tokens), LiveTeacher(teacher))
    elif variant == "cached":
        cache = open_cache(cache_dir, dataset=train)
        data = CachedDataset(train, cache)
        method = TopK(TopKConfig(k=cache.manifest["top_k"], temperature=1.0, hard_weight=0.0, soft_weight=1.0), CachedTeacher())
    else:
        method = Supervised(SupervisedConfig())
    timer = _StepTimer(method)
    start = _start_memory()
    fit(student, timer, data, None, cfg, seed=recipe.seed, progress=False)
    return {"step_seconds": timer.seconds, "start_mb": start, "peak_mb": _peak_memory_mb()}


class _StepTimer:
    """Wraps a method to time each step from one call of sample_batch to the next (the loop's whole step: batch,
    sampling, forward, backward, optimiser), without touching the loop."""

    def __init__(self, method):
        self.method, self.seconds, self._t = method, [], None

    def __getattr__(self, name):
        return getattr(self.method, name)

    def sample_batch(self, student, batch):
        now = time.perf_counter()
        if self._t is not None:
            self.seconds.append(now - self._t)
        self._t = now
        return self.method.sample_batch(student, batch)

    def __call__(self, student, x, y):
        return self.method(student, x, y)


def bench_lm(recipe, *, steps: int = 20, rounds: int = 3, threads: int | None = None, top_k: int = 32,
             rows: int | None = None, max_new_tokens: int = 32, work_dir: str | None = None, progress=print) -> dict:
    """Time every variant `rounds` times in fresh processes; median step time after WARMUP_STEPS, ratios."""
    from distill.signals import write_cache
    from distill.speed import check_counts

    check_counts(steps=steps, rounds=rounds, threads=threads, top_k=top_k, rows=rows, max_new_tokens=max_new_tokens)
    threads = threads or torch.get_num_threads()
    recipe_raw = recipe.model_dump(mode="json")
    _, train, teacher, _ = _setup(recipe_raw, threads, rows)
    per_round = {v: [] for v in LM_VARIANTS}
    peaks = {v: [] for v in LM_VARIANTS}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        cache_dir = str(Path(tmp) / "cache")
        manifest = write_cache(teacher, train, cache_dir, top_k=top_k, dtype="float16", batch_size=16)
        progress(f"top-{top_k} cache: {len(train)} sequences, {manifest['stats']['bytes'] / 1e6:.1f} MB")
        for r in range(rounds):
            for v in LM_VARIANTS:
                out = _in_fresh_process(v, recipe_raw, cache_dir, steps + WARMUP_STEPS, threads, rows, max_new_tokens,
                                        run=run_lm_variant)
                timed = out["step_seconds"][WARMUP_STEPS:]
                per_round[v].append(statistics.median(timed))
                peaks[v].append(out["peak_mb"])
                progress(f"round {r + 1}/{rounds} {v:16s} step {per_round[v][-1] * 1000:.1f} ms, peak {out['peak_mb']:.0f} MB")
    step = {v: statistics.median(per_round[v]) for v in LM_VARIANTS}
    spread = {}
    for name, (a, b) in LM_RATIOS.items():
        ratios = sorted(x / y for x, y in zip(per_round[a], per_round[b]))
        spread[name] = {"min": ratios[0], "median": statistics.median(ratios), "max": ratios[-1]}
    return {"task": "causal-lm", "sequences": len(train), "batch_size": recipe.student.train.batch_size, "threads": threads,
            "steps_timed": steps, "rounds": rounds, "top_k": top_k, "max_new_tokens": max_new_tokens,
            "step_seconds": step, "round_step_seconds": per_round, "peak_mb": {v: max(peaks[v]) for v in LM_VARIANTS},
            "ratios": {name: s["median"] for name, s in spread.items()}, "ratio_spread": spread}


def format_lm_bench(result: dict) -> str:
    lines = [f"{result['sequences']} sequences, batch {result['batch_size']}, {result['threads']} threads, median of "
             f"{result['steps_timed']} timed steps per variant, {result['rounds']} rounds (on-policy: "
             f"{result['max_new_tokens']} new tokens at most; cache: top {result['top_k']})", "",
             f"{'variant':17s} {'ms/step':>9s} {'peak MB':>9s}"]
    lines += [f"{v:17s} {result['step_seconds'][v] * 1000:9.1f} {result['peak_mb'][v]:9.0f}" for v in LM_VARIANTS]
    lines.append("")
    for name, s in result["ratio_spread"].items():
        lines.append(f"{name:34s} {s['median']:.3f}   per round: min {s['min']:.3f}, max {s['max']:.3f}")
    note = rounds_note(result["rounds"])
    return "\n".join(lines + ([note] if note else []))
