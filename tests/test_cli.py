"""End to end through the CLI: the run folder, the three roles, resume, and one-line errors for bad input."""

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distill.cli import main
from conftest import tiny_recipe


def _write(tmp_path, raw, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _no_run_folder(tmp_path, name="tiny"):
    runs = tmp_path / "runs"
    return not (runs / name).exists() and not (runs / f"{name}.partial").exists()


def test_run_writes_the_whole_report(tmp_path, capsys):
    recipe = _write(tmp_path, tiny_recipe(tmp_path))
    assert main(["run", recipe, "--quiet"]) == 0
    out = tmp_path / "runs" / "tiny"
    for f in ("results.json", "report.md", "curves.png", "accuracy_vs_size.png", "recipe.yaml", "log.txt",
              "history.json", "teacher.safetensors", "scratch.safetensors", "student.safetensors"):
        assert (out / f).is_file(), f
    assert not (tmp_path / "runs" / "tiny.partial").exists() and not (out / "state").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"] == "tiny" and results["task"] == "classification" and results["dataset"] == "digits"
    assert list(results["models"]) == ["teacher", "scratch", "student"]
    for role, m in results["models"].items():
        for key in ("metric", "score", "params", "size_mb_fp32", "size_mb_fp16", "latency_ms", "train_seconds", "accuracy", "errors"):
            assert m[key] is not None, (role, key)
        assert m["errors"] == round((1 - m["accuracy"]) * m["test_size"])
    assert results["models"]["teacher"]["params"] > results["models"]["student"]["params"]
    assert results["models"]["scratch"]["params"] == results["models"]["student"]["params"]
    printed = capsys.readouterr().out
    assert "student" in printed and "report.md" in printed


def test_train_then_distill_then_eval(tmp_path, capsys):
    recipe = _write(tmp_path, tiny_recipe(tmp_path))
    assert main(["train", recipe, "--quiet", "name=teach"]) == 0
    teacher = tmp_path / "runs" / "teach" / "teacher.safetensors"
    assert teacher.is_file()
    # the teacher's architecture comes from its checkpoint: an override of it cannot take effect and is refused
    capsys.readouterr()
    assert main(["distill", recipe, "--quiet", "--teacher", str(teacher), "teacher.model.hidden=[7]", "--no-scratch"]) == 2
    assert "teacher.model.hidden has no effect: the teacher is loaded" in capsys.readouterr().err
    assert main(["distill", recipe, "--quiet", "--teacher", str(teacher), "--no-scratch"]) == 0
    results = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "student"]
    teach_results = json.loads((tmp_path / "runs" / "teach" / "results.json").read_text())
    assert results["models"]["teacher"]["accuracy"] == teach_results["models"]["teacher"]["accuracy"]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "runs" / "tiny" / "student.safetensors"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["accuracy"] == pytest.approx(results["models"]["student"]["accuracy"])


def test_methods_lists_kd_and_its_parameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "kd" in out and "temperature" in out and "hard_weight" in out


def _teacher_files(tmp_path):
    pt = tmp_path / "teacher.pt"
    torch.save({"w": torch.zeros(3)}, pt)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(100)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-50])
    return pt, cut


@pytest.mark.parametrize(
    "args, message",
    [
        (["distill.temprature=3"], "did you mean 'distill.temperature'"),
        (["distill.temperature=0"], "greater than 0"),
        (["distill.soft_weight=-1"], "greater than or equal to 0"),
        (["student.train.lr=fast"], "valid number"),
        (["data.dataset=mnist", "data.data_dir=/nonexistent/x", "data.download=false"], "DISTILL_DATA_DIR"),
        (["data.dataset=table"], "path"),
        (["--teacher", "{pt}"], "not a safetensors file"),
        (["--teacher", "{cut}"], "safetensors"),
        (["--teacher", "{missing}"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_folder(tmp_path, capsys, args, message):
    pt, cut = _teacher_files(tmp_path)
    args = [a.format(pt=pt, cut=cut, missing=tmp_path / "nope.safetensors") for a in args]
    command = "distill" if "--teacher" in args else "run"
    code = main([command, _write(tmp_path, tiny_recipe(tmp_path)), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("distill: error:") and "\n" not in err and message in err, err
    assert _no_run_folder(tmp_path)


def test_distill_without_a_teacher_says_how(tmp_path, capsys):
    assert main(["distill", _write(tmp_path, tiny_recipe(tmp_path)), "--quiet"]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_teacher_from_another_split_is_refused(tmp_path, capsys):
    recipe = _write(tmp_path, tiny_recipe(tmp_path))
    assert main(["train", recipe, "--quiet", "name=teach"]) == 0
    teacher = str(tmp_path / "runs" / "teach" / "teacher.safetensors")
    assert main(["distill", recipe, "--quiet", "--teacher", teacher, "data.split_seed=5"]) == 2
    assert "data.split_seed=0" in capsys.readouterr().err


def test_killed_run_resumes(tmp_path, monkeypatch):
    """Kill the run while the student trains; --resume keeps the trained teacher and scratch and finishes."""
    from distill.methods import kd

    raw = tiny_recipe(tmp_path)
    recipe = _write(tmp_path, raw)
    assert main(["run", recipe, "--quiet", "name=straight"]) == 0
    straight = json.loads((tmp_path / "runs" / "straight" / "results.json").read_text())

    calls = {"n": 0}
    original = kd.KD.__call__

    def dying(self, student, x, y):
        calls["n"] += 1
        if calls["n"] == 25:  # inside the second epoch of the student
            raise KeyboardInterrupt
        return original(self, student, x, y)

    monkeypatch.setattr(kd.KD, "__call__", dying)
    assert main(["run", recipe, "--quiet"]) == 130
    partial = tmp_path / "runs" / "tiny.partial"
    assert (partial / "teacher.safetensors").is_file() and not (tmp_path / "runs" / "tiny").exists()
    teacher_mtime = (partial / "teacher.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(kd.KD, "__call__", original)
    assert main(["run", recipe, "--quiet", "--resume"]) == 0
    resumed = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert not partial.exists()
    assert (tmp_path / "runs" / "tiny" / "teacher.safetensors").stat().st_mtime_ns == teacher_mtime  # not retrained
    for role in ("teacher", "scratch", "student"):
        assert resumed["models"][role]["accuracy"] == straight["models"][role]["accuracy"], role


def test_resume_with_another_recipe_is_refused(tmp_path, capsys, monkeypatch):
    from distill.methods import kd

    recipe = _write(tmp_path, tiny_recipe(tmp_path))

    def dying(self, student, x, y):
        raise KeyboardInterrupt

    monkeypatch.setattr(kd.KD, "__call__", dying)
    assert main(["run", recipe, "--quiet"]) == 130  # killed while distilling: teacher and scratch are kept
    monkeypatch.undo()
    assert main(["run", recipe, "--quiet", "--resume", "data.split_seed=3"]) == 2
    assert "data.split_seed=0" in capsys.readouterr().err
    assert (tmp_path / "runs" / "tiny.partial" / "teacher.safetensors").is_file()  # nothing was thrown away


@pytest.mark.parametrize("case", ["output_dir_is_a_file", "binary_recipe", "negative_width", "zero_channels"])
def test_more_bad_input_is_one_line(tmp_path, capsys, case):
    raw = tiny_recipe(tmp_path)
    extra = []
    if case == "output_dir_is_a_file":
        (tmp_path / "afile").write_text("x")
        extra = [f"output_dir={tmp_path / 'afile'}"]
    elif case == "negative_width":
        extra = ["student.model.hidden=[-3]"]
    elif case == "zero_channels":
        extra = ["teacher.model={kind: cnn, channels: [0]}"]
    recipe = _write(tmp_path, raw)
    if case == "binary_recipe":
        (tmp_path / "recipe.yaml").write_bytes(b"\xff\xfe\x00\x81binary")
    assert main(["run", recipe, "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill: error:") and "\n" not in err, err


def test_an_ensemble_of_trained_teachers_from_the_recipe(tmp_path, capsys):
    recipe = _write(tmp_path, tiny_recipe(tmp_path))
    assert main(["train", recipe, "--quiet", "name=t1"]) == 0
    assert main(["train", recipe, "--quiet", "name=t2", "seed=1", "teacher.model.hidden=[64]"]) == 0
    a, b = (str(tmp_path / "runs" / n / "teacher.safetensors") for n in ("t1", "t2"))
    params = [json.loads((tmp_path / "runs" / n / "results.json").read_text())["models"]["teacher"]["params"] for n in ("t1", "t2")]
    ensemble = f"teacher.ensemble={{checkpoints: [{a}, {b}], weights: [2, 1]}}"
    assert main(["distill", recipe, "--quiet", ensemble]) == 0
    results = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert results["models"]["teacher"]["params"] == sum(params)  # the ensemble is the teacher that is reported
    assert results["config"]["teacher"]["ensemble"]["weights"] == [2.0, 1.0]
    capsys.readouterr()
    assert main(["distill", recipe, "--quiet", f"teacher.ensemble={{checkpoints: [{a}, {b}], weights: [1]}}"]) == 2
    assert "one weight" in capsys.readouterr().err
    assert main(["run", recipe, "--quiet", f"teacher.checkpoint={a}", ensemble]) == 2
    assert "not both" in capsys.readouterr().err


def test_methods_also_lists_who_teaches_and_on_which_rows(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for key in ("teacher.ensemble", "teacher.specialists", "assistants", "transfer.omit_classes", "teacher.cache"):
        assert f"  {key} " in out
