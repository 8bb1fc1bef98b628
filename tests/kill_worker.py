"""`python kill_worker.py MODE OPTS... -- DISTILL ARGS...`: run the distill CLI in this process and SIGKILL it at a
chosen point (a real kill: no finally block, no flush, no cleanup runs). Used by test_kill_resume.py.

    step ROLE N      at the N-th optimiser step of the stage named ROLE (teacher, scratch, student, ...)
    replace K        at the K-th os.replace: a file or a training-state folder written but not yet in place
    shard-rows R     (any number of times, before the mode) the teacher cache is written in shards of R rows
"""

import os
import signal
import sys


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(role: str, n: int) -> None:
    import distill.runner as runner
    import distill.train_step as train_step

    now = {"role": None, "steps": 0}
    fit, step = runner.fit, train_step.StepRunner.step

    def counting_fit(*a, desc=None, **k):
        now["role"], now["steps"] = desc, 0
        return fit(*a, desc=desc, **k)

    def counting_step(self, batches):
        if now["role"] == role:
            now["steps"] += 1
            if now["steps"] == n:
                die()
        return step(self, batches)

    runner.fit, train_step.StepRunner.step = counting_fit, counting_step


def kill_at_replace(k: int) -> None:
    replace, calls = os.replace, [0]

    def counting_replace(*a, **kw):
        calls[0] += 1
        if calls[0] == k:
            die()
        return replace(*a, **kw)

    os.replace = counting_replace


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)  # as the tests' own process (conftest): bit-identical floats
    sep = argv.index("--")
    opts, args = argv[:sep], argv[sep + 1:]
    while opts[0] == "shard-rows":
        from distill.signals.cache import write_cache

        write_cache.__kwdefaults__["shard_rows"] = int(opts[1])
        opts = opts[2:]
    if opts[0] == "step":
        kill_at_step(opts[1], int(opts[2]))
    elif opts[0] == "replace":
        kill_at_replace(int(opts[1]))
    else:
        raise SystemExit(f"unknown mode {opts[0]}")
    from distill.cli import main as distill_main

    return distill_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
