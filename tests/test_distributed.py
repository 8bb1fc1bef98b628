"""Data-parallel training through Accelerate: 2 CPU processes (gloo) give the single-process result."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from conftest import tiny_recipe

HERE = Path(__file__).parent


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("method", ["kd", "hints"])  # hints: the method's own regressor is trained too
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, method):
    from ddp_worker import distil
    from distill.checkpoint import save_model
    from distill.students import MLPConfig, build_model

    torch.manual_seed(1)
    teacher_path = tmp_path / "teacher.safetensors"
    save_model(teacher_path, build_model(MLPConfig(hidden=[64]), (1, 8, 8), 10), {})
    out = tmp_path / "ddp.safetensors"
    _torchrun([str(HERE / "ddp_worker.py"), str(teacher_path), str(out), method], tmp_path)
    single = distil(str(teacher_path), method).state_dict()
    ddp = safetensors.torch.load_file(out)
    assert set(ddp) == set(single)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, atol=2e-5, rtol=1e-4)


def test_a_recipe_runs_under_torchrun_and_only_the_main_process_writes(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    done = _torchrun(["-m", "distill.cli", "run", str(recipe), "--quiet"], tmp_path)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["tiny"], runs
    assert done.stdout.count("report:") == 1  # one summary, from the main process
    assert (tmp_path / "runs" / "tiny" / "results.json").exists()
