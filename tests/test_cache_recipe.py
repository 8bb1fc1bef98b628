"""teacher.cache in recipes: `distill cache` then `distill distill teacher.cache=DIR`, with no teacher in memory."""

import json

import pytest
import yaml

from conftest import tiny_recipe
from distill.cli import main


@pytest.fixture
def trained(tmp_path, capsys):
    """A tiny recipe, its trained teacher and a full float32 cache of the students' rows."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    assert main(["train", str(recipe), "--quiet"]) == 0
    teacher = str(tmp_path / "runs" / "tiny" / "teacher.safetensors")
    cache = tmp_path / "cache"
    assert main(["cache", str(recipe), "--teacher", teacher, "--out", str(cache), "--dtype", "float32"]) == 0
    capsys.readouterr()
    return recipe, teacher, cache


def _results(tmp_path, name):
    return json.loads((tmp_path / "runs" / name / "results.json").read_text())["models"]


def test_distilling_from_the_cache_equals_the_live_teacher(tmp_path, trained, capsys):
    recipe, teacher, cache = trained
    assert main(["distill", str(recipe), "--quiet", "--teacher", teacher, "name=live"]) == 0
    assert main(["distill", str(recipe), "--quiet", f"teacher.cache={cache}", "name=cached"]) == 0
    live, cached = _results(tmp_path, "live"), _results(tmp_path, "cached")
    assert "teacher" not in cached  # no teacher network was loaded
    assert cached["student"]["errors"] == live["student"]["errors"]
    assert cached["student"]["accuracy"] == live["student"]["accuracy"]
    # with --teacher too, the cache is checked against it and the teacher is reported
    assert main(["distill", str(recipe), "--quiet", "--teacher", teacher, f"teacher.cache={cache}", "name=both"]) == 0
    assert "teacher" in _results(tmp_path, "both")


@pytest.mark.parametrize("overrides, words", [
    (["distill.method=hints", "distill.student_layer=net.1", "distill.teacher_layer=net.1"], "--features net.1"),
    (["distill.method=sobolev"], "live teacher network"),
    (["teacher.cache={cache}", "student.train.jitter=1"], "jitter"),
    (["transfer.omit_classes=[3]"], "the dataset has"),
])
def test_what_a_cache_cannot_serve_is_refused_before_training(tmp_path, trained, capsys, overrides, words):
    recipe, _, cache = trained
    overrides = [o.format(cache=cache) for o in overrides]
    argv = ["distill", str(recipe), "--quiet", f"teacher.cache={cache}", "name=bad", *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err, err
    assert not (tmp_path / "runs" / "bad").exists() and not (tmp_path / "runs" / "bad.partial").exists()


def test_a_topk_cache_serves_only_exact_losses(tmp_path, trained, capsys):
    recipe, teacher, _ = trained
    topk = tmp_path / "top3"
    assert main(["cache", str(recipe), "--teacher", teacher, "--out", str(topk), "--top-k", "3"]) == 0
    assert main(["distill", str(recipe), "--quiet", f"teacher.cache={topk}", "name=ok"]) == 0
    assert main(["distill", str(recipe), "--quiet", f"teacher.cache={topk}", "name=refused", "distill.method=dkd"]) == 2
    assert "top 3 logits" in capsys.readouterr().err


def test_a_cache_cannot_stand_for_a_teacher_trained_in_the_same_run(tmp_path, trained, capsys):
    recipe, _, cache = trained
    assert main(["run", str(recipe), "--quiet", f"teacher.cache={cache}"]) == 2
    assert "distill distill RECIPE teacher.cache=DIR" in capsys.readouterr().err


def test_the_cache_of_a_hints_recipe_stores_its_teacher_layer_and_serves_it(tmp_path, trained, capsys):
    recipe, teacher, _ = trained
    hints = ["distill.method=hints", "distill.student_layer=net.1", "distill.teacher_layer=net.1"]
    cache = tmp_path / "hints-cache"
    assert main(["cache", str(recipe), "--teacher", teacher, "--out", str(cache), "--dtype", "float32", *hints]) == 0
    assert "features of net.1" in capsys.readouterr().out
    assert json.loads((cache / "manifest.json").read_text())["features"] == ["net.1"]
    assert main(["distill", str(recipe), "--quiet", "--teacher", teacher, "name=live", *hints]) == 0
    assert main(["distill", str(recipe), "--quiet", f"teacher.cache={cache}", "name=cached", *hints]) == 0
    live, cached = _results(tmp_path, "live"), _results(tmp_path, "cached")
    assert cached["student"]["accuracy"] == live["student"]["accuracy"]
    assert cached["student"]["errors"] == live["student"]["errors"]
    # a top-k cache serves the rest bucket only at T = 1, and only k up to the stored top k
    top3 = tmp_path / "top3"
    assert main(["cache", str(recipe), "--teacher", teacher, "--out", str(top3), "--top-k", "3"]) == 0
    topk = ["distill.method=topk", "distill.rest=bucket"]
    assert main(["distill", str(recipe), "--quiet", f"teacher.cache={top3}", "name=t1", *topk, "distill.k=3",
                 "distill.temperature=1"]) == 0
    for extra, words in ((["distill.k=3", "distill.temperature=2"], "temperature=1"), (["distill.k=4"], "k=4 is more than the 3")):
        capsys.readouterr()
        assert main(["distill", str(recipe), "--quiet", f"teacher.cache={top3}", "name=bad", *topk, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err
