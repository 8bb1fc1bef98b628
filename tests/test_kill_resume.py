"""A real SIGKILL at a random (seeded) moment, then `--resume` (or the same command again): the result is the
uninterrupted one, bit for bit on CPU. The killed process is tests/kill_worker.py, which runs the CLI and kills
itself at the N-th optimiser step of a stage, or at the K-th os.replace (a file or state folder written, not yet in
place). The resumes run in this process."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

import distill.runner
import distill.train_step
from conftest import tiny_recipe
from distill.checkpoint import load_model_file
from distill.cli import main

WORKER = Path(__file__).with_name("kill_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
ROLES = ("teacher", "scratch", "student")


def killed(*worker_args) -> None:
    """Run kill_worker.py with `worker_args`; it must end killed by SIGKILL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(WORKER), *map(str, worker_args)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -signal.SIGKILL, f"exit {p.returncode}: {p.stderr[-3000:]}"


class Counts:
    """Optimiser steps per stage and os.replace calls of one uninterrupted command, run in this process."""

    def __init__(self):
        self.steps, self.replaces, self.role = {}, 0, None

    def run(self, argv) -> None:
        fit, step, replace = distill.runner.fit, distill.train_step.StepRunner.step, os.replace

        def counting_fit(*a, desc=None, **k):
            self.role = desc
            return fit(*a, desc=desc, **k)

        def counting_step(runner, batches):
            self.steps[self.role] = self.steps.get(self.role, 0) + 1
            return step(runner, batches)

        def counting_replace(*a, **k):
            self.replaces += 1
            return replace(*a, **k)

        with mock.patch.object(distill.runner, "fit", counting_fit), \
                mock.patch.object(distill.train_step.StepRunner, "step", counting_step), \
                mock.patch.object(os, "replace", counting_replace):
            assert main(argv) == 0


def weights(run: Path) -> dict:
    return {role: load_model_file(run / f"{role}.safetensors")[0] for role in ROLES}


def assert_same_weights(a: dict, b: dict) -> None:
    for role in ROLES:
        assert a[role].keys() == b[role].keys(), role
        for name in a[role]:
            assert torch.equal(a[role][name], b[role][name]), f"{role}: {name}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of a small digits recipe, with its step and write counts."""
    tmp = tmp_path_factory.mktemp("kill")
    raw = tiny_recipe(tmp, report={"repeats": 1, "throughput_batch": 32})
    raw["teacher"]["model"]["hidden"] = [32]
    raw["teacher"]["train"] |= {"epochs": 2, "save_every": 7}  # most kills then fall between two states, mid-epoch
    raw["student"]["train"] |= {"epochs": 2, "save_every": 7}
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    counts = Counts()
    counts.run(["run", str(recipe), "--quiet", "name=straight"])
    return tmp, recipe, counts, weights(tmp / "runs" / "straight")


def test_a_run_killed_in_each_stage_in_turn_resumes_to_the_same_weights(straight):
    """Killed in the teacher stage, then its resume killed in scratch, then that one's in the student: each time
    at a random step after the stage's first state, so each resume starts mid-stage from a state."""
    tmp, recipe, counts, want = straight
    partial = tmp / "runs" / "killed.partial"
    for i, role in enumerate(ROLES):
        n = random.Random(f"stage {role}").randint(8, counts.steps[role])
        killed("step", role, n, "--", "run", recipe, "--quiet", "name=killed", *(["--resume"] if i else []))
        assert (partial / "state" / role).is_dir() and not (tmp / "runs" / "killed").exists()
    assert main(["run", str(recipe), "--quiet", "name=killed", "--resume"]) == 0
    assert_same_weights(weights(tmp / "runs" / "killed"), want)


def test_a_run_killed_while_writing_a_file_resumes_to_the_same_weights(straight):
    tmp, recipe, counts, want = straight
    k = random.Random("run write").randint(1, counts.replaces)
    killed("replace", k, "--", "run", recipe, "--quiet", "name=killed-write")
    assert main(["run", str(recipe), "--quiet", "name=killed-write", "--resume"]) == 0
    assert_same_weights(weights(tmp / "runs" / "killed-write"), want)
    assert sorted(p.name for p in (tmp / "runs" / "killed-write").iterdir()) == sorted(
        p.name for p in (tmp / "runs" / "straight").iterdir())  # no temp file of the killed write is left over


def test_a_cache_killed_while_writing_continues_to_the_same_bytes(straight, monkeypatch, capsys):
    from distill.signals.cache import write_cache

    tmp, recipe, _, _ = straight
    teacher = tmp / "runs" / "straight" / "teacher.safetensors"
    monkeypatch.setitem(write_cache.__kwdefaults__, "shard_rows", 200)  # several shards, as the worker writes them
    argv = ["cache", str(recipe), "--teacher", str(teacher), "--dtype", "float32"]
    counts = Counts()
    counts.run([*argv, "--out", str(tmp / "cache-straight")])
    k = random.Random("cache write").randint(1, counts.replaces)
    killed("shard-rows", 200, "replace", k, "--", *argv, "--out", tmp / "cache-killed")
    assert main([*argv, "--out", str(tmp / "cache-killed")]) == 0
    assert "resumed" in capsys.readouterr().out or k <= 2  # (killed before the first shard was in place: none kept)
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(tmp / "cache-killed") == files(tmp / "cache-straight")


def test_a_language_model_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, capsys):
    """The LLM case: a causal-LM run (GPT-2 teacher, Llama student from configs), its student killed in the middle of
    an epoch between two of its states (one every 3 steps), resumed at the exact batch."""
    from lm_fixtures import lm_recipe

    raw = lm_recipe(tmp_path)
    raw["teacher"]["train"]["epochs"] = 1
    raw["student"]["train"] |= {"epochs": 2, "save_every": 3}
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    counts = Counts()
    counts.run(["run", str(recipe), "--quiet", "name=straight"])
    per_epoch = counts.steps["student"] // 2
    n = random.Random("lm").choice([s for s in range(4, counts.steps["student"]) if s % per_epoch and s % 3])
    killed("step", "student", n, "--", "run", recipe, "--quiet", "name=killed")
    assert (tmp_path / "runs" / "killed.partial" / "state" / "student").is_dir()  # resumed from a state, mid-epoch
    assert main(["run", str(recipe), "--quiet", "name=killed", "--resume"]) == 0
    for role in ROLES:
        a, _ = load_model_file(tmp_path / "runs" / "straight" / role / "model.safetensors")
        b, _ = load_model_file(tmp_path / "runs" / "killed" / role / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role
    # a text model's folder lists its files' sha256 (SHA256SUMS): an edited config is refused, not built
    config = tmp_path / "runs" / "killed" / "student" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 2**20}))
    assert main(["eval", str(config.parent)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{config} is damaged" in err and "sha256" in err, err
