"""Data-parallel training through Accelerate: 2 CPU processes (gloo) give the single-process result."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from conftest import tiny_recipe, torchrun

HERE = Path(__file__).parent


# hints: the method's own regressor is trained too; cached: each process reads its rows' teacher logits and
# features from a cache, and must match one process with the live teacher
@pytest.mark.parametrize("method, cached", [("kd", False), ("hints", False), ("hints", True)])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, method, cached):
    from ddp_worker import distil, load_teacher, rows
    from distill.checkpoint import save_model
    from distill.signals import write_cache
    from distill.students import MLPConfig, build_model

    torch.manual_seed(1)
    teacher_path = tmp_path / "teacher.safetensors"
    save_model(teacher_path, build_model(MLPConfig(hidden=[64]), (1, 8, 8), 10), {})
    if cached:
        write_cache(load_teacher(str(teacher_path)), rows(), tmp_path / "cache", dtype="float32", features=["net.1"])
    out = tmp_path / "ddp.safetensors"
    cache = ["--cache", str(tmp_path / "cache")] if cached else []
    torchrun([str(HERE / "ddp_worker.py"), "--teacher", str(teacher_path), "--out", str(out), "--method", method, *cache],
              tmp_path)
    _assert_same_weights(out, distil(str(teacher_path), method))


def _assert_same_weights(path, model):
    _assert_same_weights_in_memory(safetensors.torch.load_file(path), model)


def _assert_same_weights_in_memory(weights, model):
    weights = weights if isinstance(weights, dict) else weights.state_dict()
    single = model.state_dict()
    assert set(weights) == set(single)
    for name, value in single.items():
        torch.testing.assert_close(weights[name], value, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["kd", "hints"])
def test_fsdp_trains_shards_and_resumes_like_one_process(tmp_path, method):
    from ddp_worker import distil
    from distill.checkpoint import save_model
    from distill.students import MLPConfig, build_model

    torch.manual_seed(1)
    teacher_path = tmp_path / "teacher.safetensors"
    save_model(teacher_path, build_model(MLPConfig(hidden=[64]), (1, 8, 8), 10), {})
    single = distil(str(teacher_path), method)
    norms = single.net[1].weight.norm(dim=1)  # the max-norm constraint bites, so FSDP must apply it alike
    assert norms.max() <= 0.5 + 1e-5 and (norms > 0.499).any()
    run = [str(HERE / "ddp_worker.py"), "--teacher", str(teacher_path), "--method", method, "--engine", "fsdp"]
    done = torchrun([*run, "--out", str(tmp_path / "fsdp.safetensors")], tmp_path)
    assert done.stdout.count("batches trained: 48, sharded: True") == 2, done.stdout
    _assert_same_weights(tmp_path / "fsdp.safetensors", single)
    # killed in epoch 2 (16 batches an epoch): the resumed run restores the gathered weights and optimizer state
    state = ["--state-dir", str(tmp_path / "state")]
    torchrun([*run, "--out", str(tmp_path / "killed.safetensors"), *state, "--kill-at-step", "24"], tmp_path, ok=False)
    assert (tmp_path / "state").is_dir() and not (tmp_path / "killed.safetensors").exists()
    saved = safetensors.torch.load_file(tmp_path / "state" / "model.safetensors")  # gathered, not one shard
    assert saved["student.net.1.weight"].shape == single.net[1].weight.shape
    shutil.copytree(tmp_path / "state", tmp_path / "state-copy")  # with the best-on-validation weights beside it
    shutil.copy(tmp_path / "state.best.safetensors", tmp_path / "state-copy.best.safetensors")
    # the checkpoint does not depend on the sharding: one process resumes it to the same weights
    _assert_same_weights_in_memory(distil(str(teacher_path), method, state_dir=str(tmp_path / "state-copy")), single)
    done = torchrun([*run, "--out", str(tmp_path / "resumed.safetensors"), *state], tmp_path)
    assert done.stdout.count("batches trained: 32, sharded: True") == 2  # each process: epochs 2 and 3 only, 16 batches each
    _assert_same_weights(tmp_path / "resumed.safetensors", single)


def test_a_recipe_runs_under_torchrun_and_only_the_main_process_writes(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    done = torchrun(["-m", "distill.cli", "run", str(recipe), "--quiet"], tmp_path)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["tiny"], runs
    assert done.stdout.count("report:") == 1  # one summary, from the main process
    assert (tmp_path / "runs" / "tiny" / "results.json").exists()


@pytest.mark.parametrize("engine, words", [("FSDP", "set up distributed type NO, as it runs FSDP on GPUs only"),
                                           ("DEEPSPEED", "which distill does not support: use DDP or FSDP")])
def test_an_engine_that_cannot_run_is_refused_not_dropped(monkeypatch, engine, words):
    from distill.errors import UserError
    from distill.train import make_accelerator

    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    with pytest.raises(UserError, match=words) as e:
        make_accelerator(cpu=True)
    assert "\n" not in str(e.value)


def test_deepspeed_and_gradient_accumulation_are_refused_by_fit(digits):
    from accelerate.utils import DistributedType

    from distill.errors import UserError
    from distill.methods.supervised import Supervised, SupervisedConfig
    from distill.recipe import TrainConfig
    from distill.students import MLPConfig, build_model
    from distill.train import fit, make_accelerator

    accelerator = make_accelerator(cpu=True)

    class Pretend:  # an Accelerator set up for DeepSpeed, as `accelerate launch` with a DeepSpeed config gives
        distributed_type = DistributedType.DEEPSPEED

        def __getattr__(self, name):
            return getattr(accelerator, name)

    model = build_model(MLPConfig(hidden=[4]), digits.input_shape, 10)
    with pytest.raises(UserError, match="DEEPSPEED, which distill does not support: use DDP or FSDP"):
        fit(model, Supervised(SupervisedConfig()), digits.train, None, TrainConfig(epochs=1), accelerator=Pretend(), progress=False)
    Pretend.distributed_type, Pretend.gradient_accumulation_steps = DistributedType.NO, 4
    with pytest.raises(UserError, match="accumulate gradients over 4 batches"):
        fit(model, Supervised(SupervisedConfig()), digits.train, None, TrainConfig(epochs=1), accelerator=Pretend(), progress=False)


def test_a_recipe_runs_under_fsdp_and_saves_whole_weights(tmp_path):
    from distill.checkpoint import load_model_file
    from distill.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, distill={"method": "hints", "student_layer": "net.1",
                                                                      "teacher_layer": "net.1"})))
    done = torchrun([str(HERE / "fsdp_recipe_worker.py"), "run", str(recipe), "--quiet"], tmp_path)
    assert done.stdout.count("report:") == 1
    run = tmp_path / "runs" / "tiny"
    for role, hidden in (("teacher", 128), ("student", 16)):
        state, _ = load_model_file(run / f"{role}.safetensors")
        assert tuple(state["net.1.weight"].shape) == (hidden, 64)  # gathered, not a shard
    fsdp = json.loads((run / "results.json").read_text())["models"]
    assert main(["run", str(recipe), "--quiet", "name=single"]) == 0  # one process, same recipe
    single = json.loads((tmp_path / "runs" / "single" / "results.json").read_text())["models"]
    for role in ("teacher", "scratch", "student"):  # the same up to the padded last batch of each epoch
        assert abs(fsdp[role]["accuracy"] - single[role]["accuracy"]) < 0.03, (role, fsdp[role], single[role])


@pytest.mark.parametrize("task", ["text-classification", "tagging"])
def test_text_run_on_two_processes_equals_one(tmp_path, task):
    """A whole text run (BERT teacher fine-tuned, teacher logits cached by the main process, KD into a shrunk
    student) under torchrun: the same teacher and student as in one process. Tagging: the processes hold
    different numbers of words in a step, weighted by their share."""
    pytest.importorskip("transformers")
    from text_fixtures import make_bert, write_conll, write_sentiment

    make_bert(tmp_path / "bert", layers=2, dropout=0.0)  # no dropout: the processes draw other random numbers
    if task == "tagging":  # 224 training sentences: 14 whole global batches of 16
        data = {"dataset": "conll", "path": str(write_conll(tmp_path / "conll", sizes=(224, 32, 32))), "max_length": 32}
    else:
        write_sentiment(tmp_path / "reviews.jsonl", 320)  # 224 training rows: 14 whole global batches of 16
        data = {"dataset": "text", "path": str(tmp_path / "reviews.jsonl"), "max_length": 32}
    raw = {"name": "text", "data": data,
           "teacher": {"model": {"kind": "hf", "path": str(tmp_path / "bert")}, "cache": "auto",
                       "train": {"epochs": 2, "batch_size": 16, "lr": 0.002}},
           "student": {"model": {"kind": "hf-shrink", "num_layers": 1}, "train": {"epochs": 2, "batch_size": 16, "lr": 0.002}},
           "distill": {"method": "kd", "temperature": 2}, "report": {"repeats": 1, "throughput_batch": 2}}
    _same_weights_on_one_and_two_processes(tmp_path, {**raw, "output_dir": str(tmp_path / "runs")})


@pytest.mark.parametrize("accumulate", [False, True])
def test_translation_run_on_two_processes_equals_one(tmp_path, accumulate):
    """A whole seq2seq run (teacher from a config, word-level KD into a smaller student; without accumulation also a
    seq-KD variant on the teacher's translations, which the main process writes and the other reads) under torchrun
    gives the single-process weights: sentences own different numbers of target tokens, each process's loss is
    weighted by its share of the step's tokens. accumulate: the two processes take each step of 32 pairs as 2
    accumulated batches of 16 (8 per process), normalised by the tokens of the whole step."""
    from translation_fixtures import translation_recipe

    variants = {} if accumulate else {"seq-kd": {"data": {"targets": "auto"}}}
    raw = translation_recipe(tmp_path, variants=variants)  # 320 training pairs: 10 whole global batches of 32
    raw["teacher"]["train"]["epochs"], raw["student"]["train"]["epochs"] = 3, 2
    two = None
    if accumulate:
        two = copy.deepcopy(raw)
        for role in ("teacher", "student"):
            assert two[role]["train"]["batch_size"] == 32
            two[role]["train"].update(batch_size=16, grad_accum=2)
    _same_weights_on_one_and_two_processes(tmp_path, raw, two, roles=("teacher", "student", *variants))


@pytest.mark.parametrize("fused", [False, True])
def test_language_model_run_on_two_processes_equals_one(tmp_path, fused):
    """A causal-LM run (GPT-2 teacher, Llama student, both from configs; JSD per token, chunked, or fused from the
    hidden states through DDP's forward) under torchrun, each process accumulating 2 batches of 4 sequences per
    step, gives the one-process weights of steps of 16: the step's mean is over all its completion tokens, however
    they fall among processes and batches."""
    from lm_fixtures import lm_recipe

    raw = lm_recipe(tmp_path, distill={"method": "divergence", "divergence": "jsd", "beta": 0.5, "chunk_size": 16,
                                       "hard_weight": 0.5, "soft_weight": 0.5, "fused": fused})
    raw["teacher"]["train"]["epochs"], raw["student"]["train"]["epochs"] = 2, 2
    for role in ("teacher", "student"):  # SGD: Adam turns float rounding in near-zero gradients into lr-sized steps
        raw[role]["train"].update(optimizer="sgd", lr=0.1)
    two = copy.deepcopy(raw)
    for role in ("teacher", "student"):
        assert raw[role]["train"]["batch_size"] == 16
        two[role]["train"].update(batch_size=8, grad_accum=2)
    _same_weights_on_one_and_two_processes(tmp_path, raw, two)


def _same_weights_on_one_and_two_processes(tmp_path, raw: dict, two: dict | None = None, roles=("teacher", "student")) -> None:
    """Run the recipe `raw` in one process (name "one") and under torchrun on two ("two", the recipe `two` when
    given); the saved folders of `roles` must hold the same weights."""
    for name, launcher in (("one", [sys.executable, "-m", "distill.cli"]), ("two", None)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**(two if name == "two" and two else raw), "name": name}))
        if launcher:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([*launcher, "run", str(path), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            torchrun(["-m", "distill.cli", "run", str(path), "--quiet"], tmp_path)
    for role in roles:
        one = safetensors.torch.load_file(tmp_path / "runs" / "one" / role / "model.safetensors")
        two = safetensors.torch.load_file(tmp_path / "runs" / "two" / role / "model.safetensors")
        assert set(one) == set(two)
        for name, value in one.items():
            torch.testing.assert_close(two[name], value, atol=2e-5, rtol=1e-4)


def test_a_nan_that_only_one_process_sees_ends_every_process_with_one_line(tmp_path):
    """Process 1's check stops it with the line naming the NaN; process 0, blocked in the gradients' all-reduce,
    says in one line that another process stopped first. Neither hangs (tearing the process group down after an
    error waited for the other process: both hung until gloo's timeout) and neither prints a traceback."""
    from conftest import teachers_finite_and_nan

    recipe, good, bad = teachers_finite_and_nan(tmp_path)
    logs = tmp_path / "logs"
    torchrun(["--log-dir", str(logs), "--redirects", "3", str(HERE / "nan_rank_worker.py"), recipe, good, bad, "name=x"],
              tmp_path, ok=False)
    err = {p.parent.name: p.read_text().strip() for p in logs.rglob("stderr.log")}
    assert sorted(err) == ["0", "1"], err
    for line in err.values():
        assert "\n" not in line and "Traceback" not in line, line
    assert err["1"].startswith("distill: error: student: step 1 (epoch 1, batch 1): ") and "hold NaN" in err["1"]
    assert err["0"].startswith("distill: error: process 0 lost contact with another process"), err["0"]
