import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from distill.methods.supervised import Supervised, SupervisedConfig  # noqa: E402

# One intra-op thread: float results (and so the trained-student comparisons) do not depend on the core count.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"offline data folder {SHARED_DATA} is absent (it sits beside the repo on dev and CI machines)")
    return SHARED_DATA


def tiny_recipe(tmp_path, **sections) -> dict:
    """A digits recipe that trains in seconds; sections override whole top-level keys."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "digits"},
        "teacher": {"model": {"kind": "mlp", "hidden": [128]}, "train": {"epochs": 4, "batch_size": 64, "lr": 0.003}},
        "student": {"model": {"kind": "mlp", "hidden": [16]}, "train": {"epochs": 3, "batch_size": 64, "lr": 0.003}},
        "distill": {"method": "kd", "temperature": 4},
        "report": {"repeats": 3, "throughput_batch": 32},
    }
    raw.update(sections)
    return raw


def poisoned(model, value=float("nan")):
    """A copy whose last layer's bias holds `value` for class 3: every row's logit of class 3 is NaN (or inf), the
    case where soft-target losses used to stay finite with NaN gradients."""
    import copy

    import torch

    bad = copy.deepcopy(model)
    bias = [p for name, p in bad.named_parameters() if name.endswith("bias")][-1]
    with torch.no_grad():
        bias[3] = value
    return bad


def teachers_finite_and_nan(folder) -> tuple[str, str, str]:
    """(a tiny recipe with 1-epoch stages, a teacher trained by `distill train` from it, the same teacher with NaN
    in its output bias for class 3: every row's logit of class 3 is NaN), as paths, written in `folder`."""
    import yaml

    from distill.checkpoint import load_model_file, save_model
    from distill.cli import main
    from distill.tasks.classification import build_from_record

    raw = tiny_recipe(folder, report={"repeats": 1, "throughput_batch": 8})
    raw["teacher"]["train"]["epochs"] = raw["student"]["train"]["epochs"] = 1
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--quiet", "name=teach"]) == 0
    good = folder / "runs" / "teach" / "teacher.safetensors"
    state, record = load_model_file(good)
    model = build_from_record(record, str(good))
    model.load_state_dict(state)
    save_model(folder / "nan.safetensors", poisoned(model), record)  # as distill writes a teacher, with its record
    return str(recipe), str(good), str(folder / "nan.safetensors")


# --- shared by the method tests: one small real teacher, trained once per test session ---------------

@pytest.fixture(scope="session")
def digits():
    from distill.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_teacher(digits):
    """A small CNN, as in the default recipe: about 99% on digits' test split, ~5 s on 2 cores."""
    import torch

    from distill.methods.supervised import Supervised, SupervisedConfig
    from distill.recipe import TrainConfig
    from distill.students import CNNConfig, build_model
    from distill.tasks.classification import evaluate
    from distill.train import fit

    torch.manual_seed(0)
    model = build_model(CNNConfig(channels=[32, 64], hidden=[256], dropout=0.3), digits.input_shape, 10)
    fit(model, Supervised(SupervisedConfig()), digits.train, digits.val,
        TrainConfig(epochs=40, batch_size=64, lr=0.001, jitter=1), progress=False)
    assert evaluate(model, digits.test)["accuracy"] > 0.97
    return model.eval()


STUDENT_ROWS = 400  # the students' training rows: small data, where a teacher's soft targets carry information


def train_student(method, digits, seed: int, data=None, hidden=(64,), **train) -> int:
    """Train the standard test student (MLP, one hidden layer) with `method`; return its test errors.
    Scratch and distilled students with the same seed start from the same weights and see the same batches: by
    default the first STUDENT_ROWS training rows (the teacher learnt from all of them). On all 1,258 rows this MLP
    alone reaches about 11 test errors, as many as KD gives it, so the methods are compared where a teacher can
    help; the best epoch is picked on the same validation rows."""
    import torch

    from distill.recipe import TrainConfig
    from distill.students import MLPConfig, build_model
    from distill.tasks.classification import evaluate
    from distill.train import fit

    torch.manual_seed(seed)
    model = build_model(MLPConfig(hidden=list(hidden)), digits.input_shape, digits.num_classes)
    cfg = TrainConfig(**{"epochs": 60, "batch_size": 64, "lr": 0.003, **train})
    if data is None:
        from distill.data import ArrayDataset

        data = ArrayDataset(digits.train.x[:STUDENT_ROWS], digits.train.y[:STUDENT_ROWS])
    fit(model, method, data, digits.val, cfg, seed=seed, progress=False)
    return evaluate(model, digits.test)["errors"]



class KilledAt(Supervised):
    """Supervised training that raises KeyboardInterrupt (a kill) on its `at_call`-th batch."""

    def __init__(self, at_call):
        super().__init__(SupervisedConfig())
        self.at_call, self.calls = at_call, 0

    def __call__(self, student, x, y):
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt
        return super().__call__(student, x, y)


def torchrun(args, tmp_path, ok=True):
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS` in tmp_path, one thread per process;
    its return code must be 0 (ok) or not."""
    import signal
    import subprocess
    import sys

    # this checkout's distill, also where the venv's editable install points at another one (a git worktree)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "src")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # its own session, killed whole on a hang: subprocess.run's timeout kills torchrun alone and then waits forever
    # for the workers, which hold its pipes
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for 300 s: {err[-3000:]}")
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done
