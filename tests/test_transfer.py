"""Transfer-set choice: held-out rows, Hinton's omitted class with its bias correction, through the runner too."""

import json

import pytest
import torch

from conftest import tiny_recipe
from distill.data import ArrayDataset
from distill.errors import UserError
from distill.methods.kd import KD, KDConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import validate_recipe
from distill.runner import run_recipe
from distill.signals import LiveTeacher
from distill.transfer import BiasShifted, choose_bias, class_shift, errors_on_classes, split_rows


def _rows(n=200, classes=4):
    y = torch.arange(n) % classes
    return ArrayDataset(torch.arange(n, dtype=torch.float32)[:, None], y)


def test_heldout_rows_are_disjoint_stratified_and_seeded():
    data = _rows()
    t, s = split_rows(data, "heldout", 0.25, [], seed=0)
    assert len(t) == 150 and len(s) == 50
    assert not set(t.x[:, 0].tolist()) & set(s.x[:, 0].tolist())
    assert torch.bincount(s.y).tolist() == [13, 13, 12, 12] or sorted(torch.bincount(s.y).tolist()) == [12, 12, 13, 13]
    assert torch.equal(split_rows(data, "heldout", 0.25, [], seed=0)[1].x, s.x)
    assert not torch.equal(split_rows(data, "heldout", 0.25, [], seed=1)[1].x, s.x)


def test_train_rows_are_shared_and_omitted_classes_leave_only_the_students():
    data = _rows()
    t, s = split_rows(data, "train", 0.5, [1, 3], seed=0)
    assert t is data and len(s) == 100 and set(s.y.tolist()) == {0, 2}
    with pytest.raises(UserError, match="leaves no rows"):
        split_rows(data, "train", 0.5, [0, 1, 2, 3], seed=0)


def test_bias_shift_adds_to_the_chosen_logits_only():
    model = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    shifted = BiasShifted(model, class_shift(4, [2], 1.5))(x)
    assert torch.allclose(shifted - model(x), torch.tensor([0.0, 0.0, 1.5, 0.0]).expand(5, 4))
    assert sum(p.numel() for p in BiasShifted(model, class_shift(4, [2], 1.5)).parameters()) == 16


def test_auto_bias_needs_validation_rows_of_the_omitted_class():
    model = torch.nn.Linear(1, 4)
    with pytest.raises(UserError, match="data.val_fraction > 0"):
        choose_bias(model, ArrayDataset(torch.zeros(3, 1), torch.tensor([0, 1, 2])), [3], 4)


def test_omitted_three_is_learnt_from_soft_targets_and_the_bias_recovers_it(digits, digits_teacher):
    """Hinton §3 on digits: no 3 in the students' rows. Scratch never predicts 3; the distilled student does
    for some, and raising class 3's logit (bias chosen on validation rows) recovers most of the rest."""
    _, rows = split_rows(digits.train, "train", 0.5, [3], seed=0)
    assert 3 not in rows.y.tolist()
    threes = int((digits.test.y == 3).sum())

    def run(method):
        torch.manual_seed(0)
        from distill.students import MLPConfig, build_model
        from distill.recipe import TrainConfig
        from distill.train import fit

        model = build_model(MLPConfig(hidden=[64]), digits.input_shape, 10)
        fit(model, method, rows, digits.val, TrainConfig(epochs=60, batch_size=64, lr=0.003), seed=0, progress=False)
        return model.eval()

    scratch = run(Supervised(SupervisedConfig()))
    student = run(KD(KDConfig(temperature=8, hard_weight=0.1, soft_weight=0.9), LiveTeacher(digits_teacher)))
    e_scratch = errors_on_classes(scratch, digits.test, [3])["3"]["errors"]
    e_student = errors_on_classes(student, digits.test, [3])["3"]["errors"]
    bias = choose_bias(student, digits.val, [3], 10)
    corrected = BiasShifted(student, class_shift(10, [3], bias))
    e_corrected = errors_on_classes(corrected, digits.test, [3])["3"]["errors"]
    print(f"errors on {threes} test 3s: scratch {e_scratch}, distilled {e_student}, +bias {bias}: {e_corrected}")
    assert e_scratch == threes  # never saw a 3
    assert e_student < threes
    assert bias > 0 and e_corrected < e_student and e_corrected <= threes // 4


def test_runner_reports_the_omitted_class_and_the_corrected_student(tmp_path):
    raw = tiny_recipe(tmp_path, transfer={"rows": "heldout", "heldout_fraction": 0.5, "omit_classes": [3]})
    results, out = run_recipe(validate_recipe(raw), progress=False)
    models = results["models"]
    assert list(models) == ["teacher", "scratch", "student", "student+bias"]
    assert models["scratch"]["omitted_class_errors"]["3"]["errors"] == models["scratch"]["omitted_class_errors"]["3"]["n"]
    assert models["student+bias"]["bias_correction"] >= 0 and models["student+bias"]["params"] == models["student"]["params"]
    t = results["transfer"]
    assert abs(t["teacher_rows"] - t["student_rows"] * 10 / 9) < 15  # half each; the students lose the 3s and t["omit_classes"] == [3]
    assert "Classes left out of the transfer set" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["transfer"]["rows"] == "heldout"


def test_bad_transfer_settings_are_one_line(tmp_path):
    with pytest.raises(UserError, match="transfer.omit_classes: class 10 is out of range"):
        run_recipe(validate_recipe(tiny_recipe(tmp_path, transfer={"omit_classes": [10]})), progress=False)
    with pytest.raises(UserError, match="set one of the two to 0"):
        run_recipe(validate_recipe(tiny_recipe(tmp_path, data={"dataset": "digits", "unlabelled_fraction": 0.3},
                                               transfer={"omit_classes": [3]})), progress=False)
    with pytest.raises(UserError, match="data.val_fraction > 0"):  # auto bias needs validation rows: refused up front
        run_recipe(validate_recipe(tiny_recipe(tmp_path, data={"dataset": "digits", "val_fraction": 0.0},
                                               transfer={"omit_classes": [3]})), progress=False)
    with pytest.raises(UserError, match="omit_classes must be distinct"):
        validate_recipe(tiny_recipe(tmp_path, transfer={"omit_classes": [3, 3]}))
    assert not (tmp_path / "runs").exists()


def test_heldout_students_need_a_teacher_trained_on_the_other_part(tmp_path):
    from distill.checkpoint import save_model
    from distill.runner import Experiment
    from distill.tasks.classification import model_record

    plain = validate_recipe(tiny_recipe(tmp_path))
    exp = Experiment(plain, stages=("teacher",))
    path = tmp_path / "t.safetensors"
    save_model(path, exp.teacher, model_record(plain.teacher.model, exp.data, plain))
    heldout = validate_recipe(tiny_recipe(tmp_path, transfer={"rows": "heldout"}))
    with pytest.raises(UserError, match="not trained with transfer.rows=heldout"):
        Experiment(heldout, stages=("student",), teacher_checkpoint=str(path))
