"""Checks the runner makes before anything is written, and options that change how it trains."""

import json

import pytest
import torch

from conftest import tiny_recipe
from distill.data import ArrayDataset, DataSplits
from distill.errors import UserError
from distill.recipe import validate_recipe
from distill.runner import run_recipe
from distill.tasks.classification import check_compatible
from distill.students import MLPConfig, build_model


def _splits(labels):
    x = torch.rand(len(labels), 4)
    ds = ArrayDataset(x, torch.tensor(labels))
    return DataSplits(name="t", train=ds, val=ds, test=ds, num_classes=3, input_shape=(4,), class_names=["a", "b", "c"])


def test_labels_out_of_range_are_refused():
    model = build_model(MLPConfig(hidden=[4]), (4,), 3)
    check_compatible(model, model, _splits([0, 1, 2, -1]))  # -1 = unlabelled is fine
    with pytest.raises(UserError, match="label 3 is out of range for a model with 3 outputs"):
        check_compatible(model, model, _splits([0, 1, 3]))
    with pytest.raises(UserError, match="label -2"):
        check_compatible(model, model, _splits([0, -2]))


def test_teacher_and_student_output_shapes_must_agree():
    data = _splits([0, 1, 2])
    with pytest.raises(UserError, match=r"teacher outputs shape \(2, 3\) but student outputs \(2, 5\)"):
        check_compatible(build_model(MLPConfig(hidden=[4]), (4,), 3), build_model(MLPConfig(hidden=[4]), (4,), 5), data)


def test_user_table_from_the_recipe_with_unlabelled_rows(tmp_path):
    """A CSV with string labels and some missing ones, end to end through the runner (pseudo-labels on)."""
    from sklearn.datasets import make_classification
    import pandas as pd

    x, y = make_classification(n_samples=400, n_features=6, n_informative=4, n_classes=3, random_state=0)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)])
    frame["kind"] = pd.Series(["cat", "dog", "eel"]).iloc[y].to_numpy()
    frame.loc[:40, "kind"] = None
    path = tmp_path / "table.csv"
    frame.to_csv(path, index=False)
    train = {"epochs": 30, "batch_size": 32, "lr": 0.003}
    raw = tiny_recipe(tmp_path, data={"dataset": "table", "path": str(path), "label_column": "kind"},
                      teacher={"model": {"hidden": [64]}, "train": train}, student={"model": {"hidden": [16]}, "train": train})
    results, out = run_recipe(validate_recipe(raw), progress=False)
    assert results["dataset"] == "table" and results["models"]["student"]["accuracy"] > 0.6
    assert json.loads((out / "results.json").read_text())["models"]["teacher"]["params"] > 0


def test_bf16_mixed_precision_with_a_bf16_teacher_runs_on_cpu(tmp_path):
    raw = tiny_recipe(tmp_path, mixed_precision="bf16", name="bf16")
    raw["teacher"]["precision"] = "bf16"
    results, _ = run_recipe(validate_recipe(raw), progress=False)
    assert results["models"]["student"]["accuracy"] > 0.3


def test_split_check_ignores_test_fraction_where_the_test_set_is_official():
    from distill.tasks.classification import check_same_split

    mnist = {"dataset": "mnist", "test_fraction": 0.2, "split_seed": 0}
    check_same_split(mnist, {**mnist, "test_fraction": 0.5}, "t.safetensors")  # MNIST's test set is fixed
    table = {"dataset": "table", "path": "a.csv", "label_column": "y", "test_fraction": 0.2}
    with pytest.raises(UserError, match="data.test_fraction=0.2"):
        check_same_split(table, {**table, "test_fraction": 0.5}, "t.safetensors")
    with pytest.raises(UserError, match="data.label_column='y'"):
        check_same_split(table, {**table, "label_column": "z"}, "t.safetensors")


def test_a_run_with_a_feature_method_trains_its_teacher(tmp_path):
    """The pre-flight check of a feature method's layers runs the method's setup on the untrained teacher: it must
    leave the teacher trainable (a LiveTeacher wrapper freezes what it wraps)."""
    import json as _json

    import yaml as _yaml

    from conftest import tiny_recipe
    from distill.cli import main

    recipe = tmp_path / "hints.yaml"
    recipe.write_text(_yaml.safe_dump(tiny_recipe(tmp_path, distill={"method": "hints", "student_layer": "net.1",
                                                                      "teacher_layer": "net.1"})))
    assert main(["run", str(recipe), "--quiet"]) == 0
    models = _json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())["models"]
    assert models["teacher"]["accuracy"] > 0.8
