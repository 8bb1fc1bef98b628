"""teacher.specialists in recipes: class sets found or given, specialists trained, the combination reported."""

import pytest

from conftest import tiny_recipe
from distill import runner
from distill.checkpoint import read_model_record
from distill.errors import UserError
from distill.methods import kd
from distill.recipe import validate_recipe
from distill.runner import run_recipe


def test_a_recipe_with_specialists_reports_the_combined_teacher_and_resumes_without_retraining(tmp_path, monkeypatch):
    raw = tiny_recipe(tmp_path)
    raw["teacher"]["specialists"] = {"count": 4, "train": {"epochs": 2, "batch_size": 64, "lr": 0.003}}
    results, out = run_recipe(validate_recipe(raw), progress=False)
    assert list(results["models"]) == ["teacher", "teacher+specialists", "scratch", "student"]
    sets = results["specialists"]["class_sets"]
    assert sets and all(len(s) >= 2 for s in sets)
    assert len({c for s in sets for c in s}) == sum(len(s) for s in sets)  # disjoint
    combined, teacher = results["models"]["teacher+specialists"], results["models"]["teacher"]
    assert combined["params"] > teacher["params"] and combined["accuracy"] > 0.5
    assert "| teacher+specialists |" in (out / "report.md").read_text()
    for m, classes in enumerate(sets, 1):  # each specialist is saved with its class set
        assert read_model_record(out / f"specialist{m}.safetensors")["specialist_classes"] == classes

    # killed while the student trains, then resumed: the saved specialists are loaded, not trained again
    raw["name"] = "killed"
    original = kd.KD.__call__
    calls = {"n": 0}

    def dying(self, student, x, y):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return original(self, student, x, y)

    monkeypatch.setattr(kd.KD, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(validate_recipe(raw), progress=False)
    monkeypatch.setattr(kd.KD, "__call__", original)
    trained = []
    monkeypatch.setattr(runner, "train_specialist", lambda *a, **k: trained.append(a) or pytest.fail("retrained"))
    resumed, _ = run_recipe(validate_recipe(raw), resume=True, progress=False)
    assert not trained and resumed["specialists"]["class_sets"] == sets
    for role in ("teacher+specialists", "student"):
        assert resumed["models"][role]["accuracy"] == results["models"][role]["accuracy"], role


@pytest.mark.parametrize("sets, words", [
    ([[1, 2], [2, 3]], "class 2"),
    ([[1, 2], []], "empty"),
    ([[1, 12]], "12"),
])
def test_bad_class_sets_are_one_line_before_anything_is_written(tmp_path, sets, words):
    raw = tiny_recipe(tmp_path)
    raw["teacher"]["specialists"] = {"class_sets": sets}
    with pytest.raises(UserError, match=r"teacher.specialists.class_sets: .*" + words) as e:
        run_recipe(validate_recipe(raw), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_specialists_need_one_generalist(tmp_path):
    raw = tiny_recipe(tmp_path)
    raw["teacher"]["specialists"] = {"count": 2}
    raw["teacher"]["cache"] = str(tmp_path)
    with pytest.raises(UserError, match="needs one generalist"):
        validate_recipe(raw)
