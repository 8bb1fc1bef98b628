"""report.trackers / Distiller.fit(trackers=...): every epoch's metrics and the final table reach TensorBoard and
MLflow (read back from their files, offline), and what cannot be tracked is refused before training."""

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

from conftest import tiny_recipe, torchrun
from distill.errors import UserError
from distill.recipe import validate_recipe
from distill.runner import run_recipe
from distill.tracking import final_metrics, flat_config, log_epoch


@pytest.fixture(autouse=True)
def _no_mlflow_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run folder's own store, not a user's server


def _recipe(tmp_path, trackers, **sections):
    raw = tiny_recipe(tmp_path, **sections)
    raw["report"] = {**raw["report"], "trackers": trackers}
    return validate_recipe(raw)


def _teacher_only(tmp_path, trackers, epochs=2, name="tiny"):
    raw = tiny_recipe(tmp_path, name=name)
    raw["teacher"]["train"]["epochs"] = epochs
    raw["report"] = {**raw["report"], "trackers": trackers}
    return run_recipe(validate_recipe(raw), stages=("teacher",), progress=False)


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    return scalars, texts


def test_tensorboard_and_mlflow_get_every_epoch_the_recipe_and_the_final_table_run_after_run(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    variants = {"t+1": {"distill": {"temperature": 1}}}  # a variant is tracked like any role ("+" is "_" to trackers)
    results, out = run_recipe(_recipe(tmp_path, ["tensorboard", "mlflow"], variants=variants), progress=False)
    history = json.loads((out / "history.json").read_text())
    saved = json.loads((out / "results.json").read_text())
    assert not out.with_name("tiny.partial").exists()

    # TensorBoard: runs/tiny/tracking/tiny (the run name is the recipe's), moved with the run folder
    scalars, texts = _scalars(out / "tracking" / "tiny")
    for role, tag in (("teacher", "teacher"), ("scratch", "scratch"), ("student", "student"), ("t+1", "t_1")):
        rows = history[role]
        for key in ("train_loss", "val_accuracy", "val_loss", "lr", "seconds"):
            assert scalars[f"{tag}/{key}"] == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], (role, key)
        for field in ("score", "params", "size_mb_fp32", "latency_ms", "throughput_per_s"):
            assert scalars[f"final/{tag}/{field}"][0][1] == pytest.approx(saved["models"][role][field], rel=1e-6)
    assert [v for _, v in scalars["student/train_soft"]] == pytest.approx([r["train_soft"] for r in history["student"]], rel=1e-6)
    teacher, student = saved["models"]["teacher"], saved["models"]["student"]
    assert scalars["final/student/speedup"][0][1] == pytest.approx(teacher["latency_ms"] / student["latency_ms"], rel=1e-5)
    assert "| student |" in texts["final/results/text_summary"]

    # MLflow: a SQLite store in the run folder; the artifacts were logged after the publish, so they are there too
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'tracking' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.data.params["student.train.lr"] == "0.003" and run.data.params["distill.method"] == "kd"
    assert run.data.params["student.model.hidden"] == "[16]" and run.data.params["teacher.checkpoint"] == "null"
    assert run.data.params["variants.t_1.distill.temperature"] == "1"
    curve = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "student/val_accuracy"))
    assert curve == [(r["epoch"], pytest.approx(r["val_accuracy"])) for r in history["student"]]
    assert run.data.metrics["final/scratch/score"] == pytest.approx(saved["models"]["scratch"]["score"])
    assert run.info.status == "FINISHED"
    assert {"results.json", "report.md", "history.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    local = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path))
    assert json.loads(open(local).read()) == saved
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.active_run() is None  # the process is as it was

    # the same recipe again in this process: the run folder moved when published and this run reuses its .partial
    # path, so MLflow's cached connection to the old database file must not be used
    _, out = _teacher_only(tmp_path, ["mlflow"], epochs=3)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'tracking' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "teacher/train_loss")] == [1, 2, 3]
    assert "results.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_killed_run_resumes_into_the_same_mlflow_run_and_tensorboard_folder(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from distill.methods import kd

    recipe, original, calls = _recipe(tmp_path, ["tensorboard", "mlflow"]), kd.KD.__call__, {"n": 0}

    def dying(self, student, x, y):
        calls["n"] += 1
        if calls["n"] == 25:  # in the student's second epoch
            raise KeyboardInterrupt
        return original(self, student, x, y)

    monkeypatch.setattr(kd.KD, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, progress=False)
    monkeypatch.setattr(kd.KD, "__call__", original)
    _, out = run_recipe(recipe, resume=True, progress=False)
    history = json.loads((out / "history.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'tracking' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])  # one run, not two
    for role in ("teacher", "scratch", "student"):
        curve = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"{role}/train_loss"))
        assert curve == [(r["epoch"], pytest.approx(r["train_loss"])) for r in history[role]], role
    scalars, _ = _scalars(out / "tracking" / "tiny")  # the killed process's file and the resumed one's
    assert [s for s, _ in scalars["student/val_loss"]] == [1, 2, 3] and "final/student/score" in scalars


def test_with_mlflow_tracking_uri_set_mlflow_logs_to_that_server(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    server = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.chdir(tmp_path)  # that store keeps its artifacts in ./mlruns
    _, out = _teacher_only(tmp_path, ["mlflow"])
    assert not (out / "tracking").exists() and os.environ["MLFLOW_TRACKING_URI"] == server
    client = MlflowClient(tracking_uri=server)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "teacher/train_loss")] == [1, 2]
    assert "results.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_unknown_tracker_is_one_line_naming_the_valid_ones(tmp_path):
    with pytest.raises(UserError) as e:
        _recipe(tmp_path, ["tensorbord"])
    message = str(e.value)
    assert "report.trackers.0" in message and "'tensorboard'" in message and "'mlflow'" in message and "\n" not in message


@pytest.mark.parametrize("missing, words", [("mlflow", "pip install mlflow (or remove mlflow"),
                                            ("tensorboard", "pip install tensorboard"),
                                            ("sqlalchemy", "needs SQLAlchemy and alembic: pip install mlflow")])
def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(tmp_path, monkeypatch, missing, words):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (missing, "tensorboardX") else real(name, *a))
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        run_recipe(_recipe(tmp_path, ["tensorboard", "mlflow"]), progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_tracker_that_accelerate_would_drop_is_refused_not_skipped(tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])  # its own import-time check
    with pytest.raises(UserError, match="Accelerate cannot find tensorboard: pip install tensorboard"):
        _teacher_only(tmp_path, ["tensorboard"])
    assert not (tmp_path / "runs" / "tiny.partial").exists() and not (tmp_path / "runs" / "tiny").exists()


def test_no_trackers_no_tracking_folder_and_a_failing_tracker_does_not_lose_the_run(tmp_path, monkeypatch):
    from accelerate.tracking import TensorBoardTracker

    _, out = _teacher_only(tmp_path, [], name="plain")
    assert (out / "results.json").exists() and not (out / "tracking").exists()

    def broken(self, values, step=None, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardTracker, "log", broken)
    with pytest.warns(RuntimeWarning, match=r"tracker tensorboard failed \(OSError: disk full\); the run goes on without it"):
        results, out = _teacher_only(tmp_path, ["tensorboard"], name="broken")
    assert results["models"]["teacher"]["score"] > 0 and (out / "results.json").exists()


def test_a_tracker_that_cannot_start_is_refused_and_leaves_no_run_folder(tmp_path, monkeypatch):
    from accelerate.tracking import TensorBoardTracker

    def broken(self):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(TensorBoardTracker, "start", broken)
    with pytest.raises(UserError, match="a tracker could not start .PermissionError: read-only file system."):
        _teacher_only(tmp_path, ["tensorboard"])
    assert not (tmp_path / "runs" / "tiny.partial").exists() and not (tmp_path / "runs" / "tiny").exists()


def test_the_python_api_logs_every_epoch(tmp_path, digits):
    import torch

    from distill import Distiller
    from distill.students import MLPConfig, build_model

    torch.manual_seed(0)
    teacher, student = (build_model(MLPConfig(hidden=[h]), digits.input_shape, 10) for h in (32, 8))
    result = Distiller(teacher, student, temperature=2.0).fit(digits.train, digits.val, epochs=2, batch_size=256,
                                                              progress=False, trackers=["tensorboard"], tracking_dir=tmp_path / "tb")
    scalars, _ = _scalars(tmp_path / "tb" / "distill")
    assert scalars["kd/val_accuracy"] == [(r["epoch"], pytest.approx(r["val_accuracy"], rel=1e-6)) for r in result.history]
    assert [s for s, _ in scalars["kd/train_soft"]] == [1, 2]
    with pytest.raises(UserError, match="^trackers: unknown tracker 'tensorbord': choose from aim, tensorboard"):
        Distiller(teacher, student).fit(digits.train, epochs=1, trackers=["tensorbord"])


class _Tracker:
    def __init__(self, name):
        self.name, self.calls = name, []

    def log(self, values, step=None):
        self.calls.append((values, step))


def test_log_epoch_leaves_out_what_was_not_measured_and_gives_wandb_the_epoch_as_a_value():
    tensorboard, wandb = _Tracker("tensorboard"), _Tracker("wandb")
    accelerator = SimpleNamespace(trackers=[tensorboard, wandb])
    log_epoch(accelerator, "scratch", {"epoch": 3, "train_loss": 0.5, "val_loss": float("nan"), "lr": 1e-3})
    assert tensorboard.calls == [({"scratch/train_loss": 0.5, "scratch/lr": 1e-3}, 3)]
    assert wandb.calls == [({"scratch/train_loss": 0.5, "scratch/lr": 1e-3, "scratch/epoch": 3}, None)]
    log_epoch(accelerator, "specialist 1", {"epoch": 1, "train_loss": 0.25})  # names MLflow and TensorBoard take
    assert tensorboard.calls[-1] == ({"specialist_1/train_loss": 0.25}, 1)


def test_flat_config_and_final_metrics():
    config = {"name": "x", "student": {"model": {"hidden": [64, 64]}, "train": {"lr": 0.1, "patience": None}},
              "assistants": [{"model": {"hidden": [32]}}], "transfer": {"omit_classes": []}, "seed": 0, "t2": True}
    assert flat_config(config) == {"name": "x", "student.model.hidden": "[64, 64]", "student.train.lr": 0.1,
                                   "student.train.patience": "null", "assistants.0.model.hidden": "[32]",
                                   "transfer.omit_classes": "[]", "seed": 0, "t2": True}
    models = {"teacher": {"score": 0.9, "params": 1000, "latency_ms": 2.0},
              "student": {"score": 0.8, "params": 100, "latency_ms": 0.5, "throughput_per_s": None},
              "student+bias": {"score": 0.85}}
    assert final_metrics({"models": models}) == {
        "final/teacher/score": 0.9, "final/teacher/params": 1000.0, "final/teacher/latency_ms": 2.0,
        "final/teacher/speedup": 1.0, "final/teacher/compression": 1.0,
        "final/student/score": 0.8, "final/student/params": 100.0, "final/student/latency_ms": 0.5,
        "final/student/speedup": 4.0, "final/student/compression": 10.0, "final/student_bias/score": 0.85}


def test_under_torchrun_only_the_main_process_logs(tmp_path):
    import yaml

    raw = tiny_recipe(tmp_path)
    raw["report"]["trackers"] = ["tensorboard"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    torchrun(["-m", "distill.cli", "run", str(tmp_path / "recipe.yaml"), "--quiet"], tmp_path)
    folder = tmp_path / "runs" / "tiny" / "tracking" / "tiny"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # one writer: the main process's
    scalars, _ = _scalars(folder)
    history = json.loads((tmp_path / "runs" / "tiny" / "history.json").read_text())
    for role in ("teacher", "scratch", "student"):
        assert scalars[f"{role}/train_loss"] == [(r["epoch"], pytest.approx(r["train_loss"], rel=1e-6)) for r in history[role]]
