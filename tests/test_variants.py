"""One run, several distilled students (recipe `variants`), and data.targets: auto (the teacher's beam search written in
the run): on the toy translation pair, the teacher, scratch, the word-KD student and two variants land in one
results.json / report / history; a run killed in its last variant continues with --resume; a variant learns exactly
what `data.targets: DIR` teaches; refusals are one line before anything is written."""

import json

import pytest
from distill.cli import main
from distill.errors import UserError
from distill.recipe import validate_recipe
from translation_fixtures import translation_recipe, write_recipe

VARIANTS = {"seq-kd": {"data": {"targets": "auto"}, "distill": {"soft_weight": 0, "hard_weight": 1}},
            "word+seq": {"data": {"targets": "auto"}}}


def _recipe(tmp_path, **sections):
    sections = {"generate": {"beam": 3, "k_best": 2, "shard_size": 100}, "variants": VARIANTS, **sections}
    raw = translation_recipe(tmp_path, **sections)
    raw["teacher"]["train"]["epochs"], raw["student"]["train"]["epochs"] = 20, 6  # quality is not the point here
    return raw


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _assert_same_weights(a, b):
    import torch

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-4, rtol=1e-4)  # float noise of batch padding


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`distill run` with two variants learning the teacher's translations (data.targets: auto)."""
    tmp_path = tmp_path_factory.mktemp("variants")
    assert main(["run", write_recipe(tmp_path, _recipe(tmp_path)), "--quiet"]) == 0
    return tmp_path, tmp_path / "runs" / "tr"


@pytest.fixture(scope="module")
def resumed(run):
    """`distill distill --teacher` of the run's teacher: the student on the references, variant `auto` on the teacher's
    translations generated in this run, variant `dir` on those the run above generated (data.targets: DIR). Killed
    in the middle of generating, resumed; killed as `dir` starts training, resumed."""
    import distill.generate
    import distill.runner
    from distill.tasks.translation import TranslationTask

    tmp_path, out = run
    variants = {"auto": {"data": {"targets": "auto"}}, "dir": {"data": {"targets": str(out / "teacher-targets")}}}
    args = ["distill", write_recipe(tmp_path, _recipe(tmp_path, name="e", variants=variants), "e.yaml"), "--quiet",
            "--no-scratch", "--teacher", str(out / "teacher")]
    mp = pytest.MonkeyPatch()
    real_translate, real_fit, real_generate = TranslationTask.translate, distill.runner.fit, distill.generate.generate
    calls, trained, generated = [], [], []

    def killed_in_the_second_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_translate(*a, **kw)

    def killed_as_dir_starts(*a, **kw):
        if kw["desc"] == "dir":
            raise KeyboardInterrupt
        return real_fit(*a, **kw)

    mp.setattr(TranslationTask, "translate", killed_in_the_second_shard)
    assert main(args) == 130
    partial = tmp_path / "runs" / "e.partial"
    assert len(json.loads((partial / "teacher-targets.partial" / "manifest.json").read_text())["shards"]) == 1
    mp.setattr(TranslationTask, "translate", real_translate)
    mp.setattr(distill.runner, "fit", killed_as_dir_starts)
    assert main([*args, "--resume"]) == 130
    assert (partial / "auto").is_dir() and (partial / "teacher-targets").is_dir() and not (partial / "dir").exists()
    mp.setattr(distill.runner, "fit", lambda *a, **kw: trained.append(kw["desc"]) or real_fit(*a, **kw))
    mp.setattr(distill.generate, "generate", lambda *a, **kw: generated.append(1) or real_generate(*a, **kw))
    assert main([*args, "--resume"]) == 0
    mp.undo()
    return tmp_path / "runs" / "e", trained, generated


def test_one_run_holds_teacher_scratch_student_and_every_variant(run):
    from distill.generate import model_sha256

    _, out = run
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "scratch", "student", "seq-kd", "word+seq"]
    for m in results["models"].values():
        assert {"bleu", "bleu_beam", "chrf", "latency_ms"} <= set(m)
    assert list(json.loads((out / "history.json").read_text())) == ["teacher", "scratch", "student", "seq-kd", "word+seq"]
    report = (out / "report.md").read_text()
    assert "| seq-kd | 0.064 |" in report and "| word+seq |" in report.split("## Translation")[1]
    assert "- seq-kd (a variant of the distilled student, same initial weights): data.targets auto" in report
    # the teacher's translations are kept with the run, usable as data.targets of later students of its teacher
    manifest = json.loads((out / "teacher-targets" / "manifest.json").read_text())
    assert manifest["teacher_sha256"] == model_sha256(out / "teacher") and manifest["rows"] == 320
    first = json.loads((out / "teacher-targets" / "shard-00000.jsonl").read_text().splitlines()[0])
    assert len(first["hypotheses"]) == 2  # generate.k_best


def test_a_resumed_run_keeps_what_was_done_and_a_variant_learns_what_targets_dir_teaches(run, resumed):
    _, out = run
    e, trained, generated = resumed
    assert trained == ["dir"] and generated == []  # finished stages and the translations were kept
    assert list(json.loads((e / "results.json").read_text())["models"]) == ["teacher", "student", "auto", "dir"]
    # generation killed and continued, by the loaded teacher: byte for byte what the run's own teacher wrote
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(e / "teacher-targets") == files(out / "teacher-targets")
    _assert_same_weights(e / "auto", e / "dir")  # trained before the kill, and after it: the same student


def test_an_auto_cache_teaches_word_kd_on_translation_as_the_live_teacher_does(run, resumed):
    tmp_path, out = run
    e, _, _ = resumed
    recipe = write_recipe(tmp_path, _recipe(tmp_path, variants={}), "plain.yaml")
    assert main(["distill", recipe, "--quiet", "--no-scratch", "--teacher", str(out / "teacher"), "teacher.cache=auto",
                 "name=cached"]) == 0
    _assert_same_weights(tmp_path / "runs" / "cached" / "student", e / "student")  # the live teacher's student
    assert not (tmp_path / "runs" / "cached" / "teacher-cache").exists()


@pytest.mark.parametrize("variant, message", [
    ({"student": {"model": {"kind": "seq2seq", "d_model": 16}}},
     "variants.bad.student.model: a variant may change only distill.*, student.distill_train.*, data.targets and data.target_choice"),
    ({"teacher": {"cache": "auto"}}, "variants.bad.teacher: a variant may change only"),
    ({"distill": {"method": "sobolev"}}, "variants.bad: distill.method=sobolev perturbs or differentiates the inputs"),
    ({"data": {"targets": "auto", "target_choice": "closest"}},
     "variants.bad: data.target_choice: closest picks among the teacher's k best translations, and generate.k_best is 1"),
])
def test_a_variant_that_cannot_train_is_refused_with_one_line_before_anything_is_written(tmp_path, capsys, variant, message):
    raw = _recipe(tmp_path)
    raw["generate"] = {"beam": 3}  # one translation per sentence: nothing for target_choice closest to choose from
    raw["variants"] = {"seq-kd": VARIANTS["seq-kd"], "bad": variant}
    assert main(["run", write_recipe(tmp_path, raw), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill: error")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "runs").exists()


def test_a_variant_is_the_recipe_with_its_changes_merged_in():
    """Any task: the same method merges into the recipe's settings, another method replaces them; distill_train
    merges into the student's training."""
    from distill.variants import distilled_stages

    recipe = validate_recipe({"distill": {"method": "kd", "temperature": 3, "hard_weight": 0.3, "soft_weight": 0.7},
                              "student": {"train": {"epochs": 7, "lr": 0.01}},
                              "variants": {"t1": {"distill": {"temperature": 1}, "student": {"distill_train": {"lr": 0.1}}},
                                           "dkd": {"distill": {"method": "dkd", "beta": 2}}}})
    stages = distilled_stages(recipe)
    assert list(stages) == ["student", "t1", "dkd"] and stages["student"] is recipe
    t1, dkd = stages["t1"], stages["dkd"]
    assert (t1.distill.temperature, t1.distill.hard_weight, t1.distill.soft_weight) == (1, 0.3, 0.7)
    assert (t1.student.distill_train.lr, t1.student.distill_train.epochs) == (0.1, 7) and recipe.student.distill_train is None
    assert dkd.distill.method == "dkd" and (dkd.distill.beta, dkd.distill.temperature) == (2, 4.0)  # DKD's default T, not 3
    assert dkd.student.distill_train is None and not dkd.variants


def test_variant_names_must_be_free_folder_names():
    for name in ("scratch", "assistant1", "teacher-targets", "a.b"):
        with pytest.raises(UserError, match=f"variants.{name}: a variant's name must be"):
            validate_recipe({"data": {"dataset": "parallel"}, "variants": {name: {"distill": {"temperature": 2}}}})


def test_a_tokenizer_that_does_not_match_the_teachers_embeddings_is_refused(tmp_path, capsys):
    """A teacher folder whose tokenizer was swapped for one with another vocabulary: one line, exit 2."""
    from distill.data.parallel import train_tokenizer
    from distill.tasks import make_task
    from translation_fixtures import sentence_pair

    import random

    raw = _recipe(tmp_path, variants={})
    recipe = validate_recipe(raw)
    task = make_task(recipe)
    data = task.load_data()
    folder = tmp_path / "teacher"
    task.save_model(task.build_model(recipe.teacher.model, data), folder, task.record(recipe.teacher.model, data))
    rng = random.Random(1)
    other = train_tokenizer([s for _ in range(200) for s in sentence_pair(rng)], 300)
    assert len(other) != len(task.tokenizer)
    other.save_pretrained(folder)
    (folder / "SHA256SUMS").unlink()  # assembled by hand: no sums to catch the swap, so the vocabulary check does
    assert main(["distill", write_recipe(tmp_path, raw), "--quiet", "--teacher", str(folder)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill: error")]
    assert len(errors) == 1 and f"token embeddings but the tokenizer ({folder}) has {len(other)} tokens" in errors[0]
    assert not (tmp_path / "runs").exists()
