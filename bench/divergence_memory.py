"""Peak memory and time of the per-token divergence at LLM vocabularies: naive vs chunked vs fused.

    OMP_NUM_THREADS=1 python bench/divergence_memory.py            # V = 32k, B·T = 1k..16k, d = 1024
    python bench/divergence_memory.py --extra 128000x1024 --rounds 2

What one measurement is: forward + backward of the mean divergence over N = B·T counted positions (the loss of
`distill.methods.divergence` with soft_weight 1), starting from what a causal LM has at its last layer: the
final hidden states of both models (student [N, d] with gradient, teacher [N, d]) and both output projections
(W [V, d]; the student's with gradient). Three ways, same value and gradients:
  naive    logits = h·Wᵀ of both models, then token_divergence on all rows under autograd (how TRL's GKDTrainer
           and most hand-written loops compute it; the teacher's logits without a graph);
  chunked  the same logits [N, V], then chunked_divergence_sum (chunk_size rows at a time);
  fused    fused_divergence_sum from the hidden states: no [N, V] logits of either model.
The time includes both output projections (and the student's backward through its own), since fused folds
them in; the divergence alone from logits is the difference of rows, not measured separately.

How memory is measured (CPU): every configuration runs in a fresh Python process, so nothing freed by an
earlier one (allocator caches, arenas) can hide or inflate its peak. The process builds its inputs, runs a tiny
warm-up (kernels' one-off buffers), reads its resident set (VmRSS: the baseline, inputs included), resets the
kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs` zeroes VmHWM), runs the measured step and reads
VmHWM. peak = VmHWM − baseline: every byte the step held at its worst moment beyond its inputs, gradients
included (the student weight's gradient [V, d], the same in all three). glibc is told to serve every allocation
above 1 MiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and RSS follows
live tensors; PyTorch's CPU allocator keeps no cache of its own. torch.profiler's memory view would see only
tensor allocations, not the resident set a machine runs out of; RSS is what the OOM killer sees.
Time: wall time of the measured step (perf_counter). Modes take turns within each round (the order rotates
between rounds), so a slow phase of the machine hits all of them; with several rounds the median is reported.
A naive configuration whose estimated memory (8 [N, V] float32 buffers) exceeds --max-gib is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("naive", "chunked", "fused")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _status(key: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _inputs(n: int, vocab: int, hidden: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    # scaled so the logits have a realistic spread (std ~2), not a flat softmax over 32k entries
    sh = (torch.randn(n, hidden, generator=g) / hidden ** 0.5).requires_grad_(True)
    sw = (torch.randn(vocab, hidden, generator=g) * 2).requires_grad_(True)
    th = torch.randn(n, hidden, generator=g) / hidden ** 0.5
    tw = torch.randn(vocab, hidden, generator=g) * 2
    return sh, sw, th, tw


def _step(mode: str, sh, sw, th, tw, kind: str, chunk: int) -> float:
    """Forward + backward of the mean divergence; returns the loss."""
    import torch

    from distill.losses.chunked import chunked_divergence_sum, fused_divergence_sum
    from distill.losses.divergence import token_divergence

    n = sh.shape[0]
    if mode == "fused":
        loss = fused_divergence_sum(sh, sw, None, th, tw, None, kind, chunk_size=chunk) / n
    else:
        student = sh @ sw.t()
        with torch.no_grad():
            teacher = th @ tw.t()
        if mode == "naive":
            loss = token_divergence(student, teacher, kind).sum() / n
        else:
            loss = chunked_divergence_sum(student, teacher, kind, chunk_size=chunk) / n
        del student, teacher  # the graph keeps what it needs, as in a training step
    loss.backward()
    return float(loss)


def measure_one(mode: str, n: int, vocab: int, hidden: int, kind: str, chunk: int) -> dict:
    """One configuration in this (fresh) process: peak bytes above the baseline and seconds."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _step(mode, *_inputs(64, 512, 32), kind, 16)  # warm-up: kernels' one-off buffers are not the step's memory
    sh, sw, th, tw = _inputs(n, vocab, hidden)
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    loss = _step(mode, sh, sw, th, tw, kind, chunk)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - baseline
    return {"mode": mode, "rows": n, "vocab": vocab, "hidden": hidden, "kind": kind, "chunk": chunk,
            "peak_bytes": peak, "baseline_bytes": baseline, "seconds": seconds, "loss": loss}


def _run_child(mode, n, vocab, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
           "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, __file__, "--one", mode, str(n), str(vocab), "--hidden", str(args.hidden),
           "--kind", args.kind, "--chunk", str(args.chunk)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:  # e.g. killed for want of memory: reported as failed, the other configurations go on
        return {"mode": mode, "rows": n, "vocab": vocab, "failed": f"exit {out.returncode}: {out.stderr[-500:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _naive_fits(n: int, vocab: int, max_gib: float) -> bool:
    return 8 * n * vocab * 4 <= max_gib * 2 ** 30


def run(args) -> list[dict]:
    configs = [(v, n) for v in args.vocab for n in args.rows]
    configs += [tuple(int(x) for x in pair.split("x")) for pair in args.extra]
    found: dict[tuple, list[dict]] = {}
    failed: list[dict] = []
    for r in range(args.rounds):
        for i, (vocab, n) in enumerate(configs):
            order = MODES[(i + r) % 3:] + MODES[:(i + r) % 3]  # rotate who goes first
            for mode in order:
                if mode == "naive" and not _naive_fits(n, vocab, args.max_gib):
                    continue
                one = _run_child(mode, n, vocab, args)
                if "failed" in one:
                    failed.append(one)
                    print(f"round {r + 1} V={vocab} N={n} {mode}: FAILED {one['failed']}", flush=True)
                    continue
                found.setdefault((vocab, n, mode), []).append(one)
                print(f"round {r + 1} V={vocab} N={n} {mode}: {one['peak_bytes'] / 2**30:.3f} GiB, "
                      f"{one['seconds']:.2f} s", flush=True)
    rows = list(failed)
    for (vocab, n, mode), runs in found.items():
        rows.append({**runs[0], "peak_bytes": max(x["peak_bytes"] for x in runs),
                     "seconds": statistics.median(x["seconds"] for x in runs),
                     "seconds_all": [x["seconds"] for x in runs], "peak_bytes_all": [x["peak_bytes"] for x in runs]})
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["vocab"], r["rows"], r["mode"]): r for r in rows if "failed" not in r}
    failed = {(r["vocab"], r["rows"], r["mode"]) for r in rows if "failed" in r}
    lines = ["| V | B·T | naive GiB | chunked GiB | fused GiB | naive / fused mem | naive s | chunked s | fused s "
             "| fused / naive time | chunked / naive time |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for vocab, n in sorted({(r["vocab"], r["rows"]) for r in rows}):
        get = {m: by.get((vocab, n, m)) for m in MODES}
        gib = [f"{get[m]['peak_bytes'] / 2**30:.2f}" if get[m] else "failed" if (vocab, n, m) in failed else "skipped"
               for m in MODES]
        sec = [f"{get[m]['seconds']:.2f}" if get[m] else "-" for m in MODES]
        nv, fu, ch = get["naive"], get["fused"], get["chunked"]
        mem = f"{nv['peak_bytes'] / fu['peak_bytes']:.1f}x" if nv and fu else "-"
        tf = f"{fu['seconds'] / nv['seconds']:.2f}" if nv and fu else "-"
        tc = f"{ch['seconds'] / nv['seconds']:.2f}" if nv and ch else "-"
        lines.append(f"| {vocab:,} | {n:,} | {' | '.join(gib)} | {mem} | {' | '.join(sec)} | {tf} | {tc} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """The issue's target at B·T = 8192, V = 32k: >= 8x less peak memory at <= 1.1x the time (fused vs naive)."""
    by = {(r["vocab"], r["rows"], r["mode"]): r for r in rows if "failed" not in r}
    naive, fused = by.get((32000, 8192, "naive")), by.get((32000, 8192, "fused"))
    if not (naive and fused):
        return "target (B·T = 8192, V = 32k): not measured in this run"
    mem, tim = naive["peak_bytes"] / fused["peak_bytes"], fused["seconds"] / naive["seconds"]
    return (f"target at B·T = 8192, V = 32k (fused vs naive): {mem:.1f}x less peak memory (>= 8x: "
            f"{'met' if mem >= 8 else 'missed'}), {tim:.2f}x the time (<= 1.1x: {'met' if tim <= 1.1 else 'missed'})")


def write(rows: list[dict], setup: str, name: str) -> str:
    text = table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(f"# Divergence memory and time\n\n{setup}\n\n{text}\n\n{verdict(rows)}\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--one", nargs=3, metavar=("MODE", "N", "V"), help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000])
    p.add_argument("--rows", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--extra", nargs="*", default=[], metavar="VxN", help="more configurations, e.g. 128000x1024")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--kind", default="forward_kl")
    p.add_argument("--chunk", type=int, default=1024, help="positions per chunk (the method's default)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-gib", type=float, default=16.0, help="skip naive configurations estimated above this")
    p.add_argument("--name", default="divergence_memory")
    p.add_argument("--render", action="store_true", help="only rewrite NAME.md from NAME.json (e.g. with a --note)")
    p.add_argument("--note", default="", help="a sentence for the report, e.g. on the machine's load")
    args = p.parse_args()
    if args.one:
        mode, n, vocab = args.one
        print(json.dumps(measure_one(mode, int(n), int(vocab), args.hidden, args.kind, args.chunk)))
        return
    if args.render:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        print(write(saved["rows"], ". ".join(x for x in (saved["setup"], args.note) if x), args.name))
        return
    load = os.getloadavg()[0]
    rows = run(args)
    setup = (f"kind {args.kind}, d = {args.hidden}, chunk {args.chunk} rows, {args.threads} thread(s), "
             f"{args.rounds} round(s); peak = resident memory above the inputs (fresh process each); load average "
             f"{load:.1f} before and {os.getloadavg()[0]:.1f} after the run on {os.cpu_count()} cores; "
             f"command: python bench/divergence_memory.py {' '.join(sys.argv[1:])}")
    print(write(rows, ". ".join(x for x in (setup, args.note) if x), args.name))
    print(verdict(rows))


if __name__ == "__main__":
    main()
