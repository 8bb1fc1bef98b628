"""The translation task end to end: a seq2seq teacher and students from configs on a small synthetic language pair,
BLEU / chrF greedy and beam in results.json and report.md, models saved as transformers folders, one-line refusals."""

import json

import pytest
from distill.cli import main
from distill.errors import UserError
from distill.recipe import validate_recipe
from translation_fixtures import translation_recipe, write_recipe



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("translation")
    assert main(["run", write_recipe(tmp_path, translation_recipe(tmp_path)), "--quiet"]) == 0
    return tmp_path / "runs" / "tr"


def test_a_run_trains_teacher_scratch_and_word_kd_student_and_reports_bleu(run):
    results = json.loads((run / "results.json").read_text())
    models = results["models"]
    assert results["task"] == "translation" and list(models) == ["teacher", "scratch", "student"]
    for m in models.values():
        assert m["metric"] == "bleu" and m["score"] == m["bleu"]
        assert {"bleu_beam", "chrf", "chrf_beam", "token_accuracy", "beam_sentences_per_s", "samples"} <= set(m)
    assert models["teacher"]["bleu_beam"] > 60  # the toy language is learnt: word choice and reordering
    assert models["teacher"]["params"] > 3 * models["student"]["params"]
    report = (run / "report.md").read_text()
    assert "## Translation" in report and "Sample translations by the student (beam):" in report
    assert models["student"]["samples"][0]["reference"] in report


def test_a_saved_student_is_a_transformers_model_and_distill_eval_reads_it(run, capsys):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(run / "student")
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    ids = model.generate(**tokenizer(["the good film is long"], return_tensors="pt"), max_new_tokens=12)
    assert isinstance(tokenizer.decode(ids[0], skip_special_tokens=True), str)
    capsys.readouterr()
    assert main(["eval", str(run / "student"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    results = json.loads((run / "results.json").read_text())
    assert card["bleu"] == pytest.approx(results["models"]["student"]["bleu"])


@pytest.mark.parametrize("data, message", [
    ({"dataset": "digits", "vocab_size": 400}, "data.vocab_size applies to translation data"),
    ({"dataset": "en-es", "unlabelled_rows": 5}, "translation pairs are all labelled"),
])
def test_recipe_fields_that_do_not_apply_are_refused(data, message):
    with pytest.raises(UserError, match=message):
        validate_recipe({"data": data})


def test_models_that_do_not_translate_and_missing_data_are_refused(tmp_path, capsys):
    raw = translation_recipe(tmp_path)
    raw["student"]["model"] = {"kind": "mlp", "hidden": [8]}
    assert main(["run", write_recipe(tmp_path, raw, "mlp.yaml"), "--quiet"]) == 2
    assert "model.kind mlp does not translate" in capsys.readouterr().err
    raw = translation_recipe(tmp_path)
    (tmp_path / "pairs" / "valid.tsv").unlink()
    assert main(["run", write_recipe(tmp_path, raw, "missing.yaml"), "--quiet"]) == 2
    assert "has no valid.tsv / .jsonl" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tr").exists()
