"""Teacher-assistant chains (Mirzadeh et al. 2020): teacher -> assistant(s) -> student, each stage reported."""

import torch

import distill.teaching
from conftest import tiny_recipe, train_student
from distill.methods.kd import KD, KDConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import TrainConfig, validate_recipe
from distill.runner import run_recipe
from distill.signals import LiveTeacher
from distill.students import MLPConfig, build_model
from distill.train import fit


def test_each_stage_learns_from_the_one_before_and_is_reported(tmp_path, monkeypatch):
    taught = []  # (parameter count of the model used as teacher) at each distillation stage

    class Recording(LiveTeacher):
        def __init__(self, model, *args):
            super().__init__(model, *args)
            taught.append(sum(p.numel() for p in model.parameters()))

    monkeypatch.setattr(distill.teaching, "LiveTeacher", Recording)
    train = {"epochs": 2, "batch_size": 64, "lr": 0.003}
    raw = tiny_recipe(tmp_path, assistants=[{"model": {"hidden": [64]}, "train": train},
                                            {"model": {"hidden": [32]}, "train": train}])
    results, out = run_recipe(validate_recipe(raw), progress=False)
    models = results["models"]
    assert list(models) == ["teacher", "assistant1", "assistant2", "scratch", "student"]
    params = {role: models[role]["params"] for role in models}
    assert taught == [params["teacher"], params["assistant1"], params["assistant2"]]
    assert params["teacher"] > params["assistant1"] > params["assistant2"] > params["student"]
    assert models["assistant2"]["epochs"] == 2
    report = (out / "report.md").read_text()
    assert "| assistant1 |" in report and "| assistant2 |" in report


def test_a_chain_distils_a_digits_student_better_than_scratch(digits, digits_teacher):
    torch.manual_seed(0)
    assistant = build_model(MLPConfig(hidden=[256]), digits.input_shape, 10)
    kd = KDConfig(temperature=4, hard_weight=0.1, soft_weight=0.9)
    fit(assistant, KD(kd, LiveTeacher(digits_teacher)), digits.train, digits.val,
        TrainConfig(epochs=60, batch_size=64, lr=0.003), progress=False)
    scratch = sum(train_student(Supervised(SupervisedConfig()), digits, seed) for seed in (0, 1))
    chained = sum(train_student(KD(kd, LiveTeacher(assistant.eval())), digits, seed) for seed in (0, 1))
    print(f"test errors, seeds 0+1: scratch {scratch}, via assistant {chained}")
    assert chained < scratch
