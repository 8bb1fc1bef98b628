"""Defaults that train, overrides that take effect or are refused, warnings a user should see, a user's own model
class behind --allow-import, and checkpoints that find their data from any folder."""

import json

import numpy as np
import pytest
import yaml

from conftest import tiny_recipe
from distill.cli import main
from distill.errors import UserError
from distill.recipe import Recipe, TrainConfig, load_recipe
from distill.run_checks import run_warnings
from distill.schedule import DEFAULT_MIN_STEPS, resolve_epochs


def _write(tmp_path, raw, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("given, steps, expected", [
    ({}, 4, DEFAULT_MIN_STEPS // 4),  # small data: epochs raised until 1000 steps
    ({}, 200, 20),  # enough steps in 20 epochs: the default 20
    ({"epochs": 3}, 4, 3),  # epochs set: exactly that
    ({"epochs": 3, "min_steps": 40}, 4, 10),  # both: the larger
    ({"min_steps": 10}, 4, 20),
])
def test_training_length_in_epochs_and_steps(given, steps, expected):
    assert resolve_epochs(TrainConfig(**given), steps) == expected


def test_the_default_student_is_smaller_than_the_default_teacher():
    r = Recipe()
    assert r.student.model.hidden[0] < r.teacher.model.hidden[0]


def test_distill_train_inherits_what_it_does_not_set(tmp_path):
    raw = tiny_recipe(tmp_path)
    raw["student"]["distill_train"] = {"lr": 0.0005}
    r = load_recipe(_write(tmp_path, raw), ["student.train.epochs=7"])
    assert (r.student.distill_train.epochs, r.student.distill_train.lr) == (7, 0.0005)
    assert (r.student.train.epochs, r.student.train.lr) == (7, 0.003)


def test_an_override_that_cannot_take_effect_is_refused(tmp_path, capsys):
    raw = tiny_recipe(tmp_path)
    raw["student"]["distill_train"] = {"epochs": 5}
    path = _write(tmp_path, raw)
    with pytest.raises(UserError, match="student.distill_train.epochs=5 for the distilled one"):
        load_recipe(path, ["student.train.epochs=1"])
    assert load_recipe(path, ["student.train.epochs=1", "student.distill_train.epochs=1"]).student.distill_train.epochs == 1
    assert main(["train", path, "distill.temperature=2"]) == 2  # `train` trains no student
    assert "distill.temperature has no effect" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_warnings_for_a_majority_class_model_and_a_student_as_big_as_its_teacher():
    models = {"teacher": {"score": 0.97, "params": 1000}, "scratch": {"score": 0.36, "params": 1000},
              "student": {"score": 0.40, "params": 1000}}
    lines = run_warnings(models, baseline=0.36, metric="accuracy")
    assert len(lines) == 2
    assert lines[0].startswith("scratch does not beat the majority-class baseline (accuracy 36.0% vs 36.0%")
    assert "as many as the teacher (1,000)" in lines[1]
    assert run_warnings({"teacher": {"score": 0.9, "params": 10}, "student": {"score": 0.5, "params": 5}}, 0.36, "accuracy") == []


def test_a_run_reports_a_student_the_size_of_its_teacher(tmp_path):
    raw = tiny_recipe(tmp_path, student={"model": {"kind": "mlp", "hidden": [128]}, "train": {"epochs": 1}})
    assert main(["run", _write(tmp_path, raw), "--quiet", "teacher.train.epochs=1"]) == 0
    results = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert any("as many as the teacher" in w for w in results["warnings"])


def test_a_users_model_class_needs_allow_import_on_the_command_line(tmp_path, capsys):
    raw = tiny_recipe(tmp_path)
    raw["student"]["model"] = {"kind": "import", "target": "custom_models:TinyNet", "kwargs": {"width": 8}}
    path = _write(tmp_path, raw)
    assert main(["run", path, "--quiet"]) == 2
    assert "--allow-import custom_models" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny").exists()
    assert main(["run", path, "--quiet", "--allow-import", "custom_models"]) == 0
    student = tmp_path / "runs" / "tiny" / "student.safetensors"
    assert main(["eval", str(student)]) == 2  # rebuilding it imports the module again: allowed per command
    assert main(["eval", str(student), "--allow-import", "custom_models", "--json"]) == 0


def test_eval_finds_a_tables_csv_from_another_folder(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    rows = ["a,b,c,d,label"] + [f"{a:.4f},{b:.4f},{c:.4f},{d:.4f},{int(a + b > 0)}" for a, b, c, d in x]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "t.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path / "work")
    raw = tiny_recipe(tmp_path, data={"dataset": "table", "path": "t.csv"})
    assert main(["run", _write(tmp_path, raw), "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)  # elsewhere: the stored path is absolute
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "runs" / "tiny" / "student.safetensors"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    results = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert card["accuracy"] == pytest.approx(results["models"]["student"]["accuracy"])


def test_a_loaded_teachers_training_is_refused_unless_specialists_train_like_it(tmp_path):
    raw = tiny_recipe(tmp_path)
    raw["teacher"]["checkpoint"] = "t.safetensors"
    with pytest.raises(UserError, match="teacher.train.epochs has no effect: the teacher is loaded"):
        load_recipe(_write(tmp_path, raw), ["teacher.train.epochs=2"])
    raw["teacher"]["specialists"] = {"count": 2}  # no train of their own: they train with teacher.train
    assert load_recipe(_write(tmp_path, raw, "s.yaml"), ["teacher.train.epochs=2"]).teacher.train.epochs == 2
