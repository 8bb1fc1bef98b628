"""The catalogue of bad inputs: every command and the Python API, one case each.

Each CLI case must end with exactly one line on stderr (`distill: error: ...` naming the problem: the case's key
phrase), exit status 2, no traceback, no training started (everything here can be seen before training), and no new
file in the test's folder (nothing half-written). Each API case raises a one-line UserError with its phrase.
Cases build their inputs on the spot in a few milliseconds (tiny files, models from configs), and run in-process.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

import distill.train
from conftest import tiny_recipe
from distill.cli import main
from distill.errors import UserError
from lm_fixtures import lm_recipe, make_tokenizer as make_lm_tokenizer, write_jsonl
from text_fixtures import make_bert, write_conll, write_sentiment
from translation_fixtures import translation_recipe


# ------------------------------------------------------------------------------------------------ recipe writers
def _yaml(t: Path, raw, name="recipe.yaml") -> str:
    path = t / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def digits(t: Path, **sections) -> str:
    return _yaml(t, tiny_recipe(t, **sections))


def table(t: Path, rows: int, **data) -> str:
    lines = ["a,b,label"] + [f"{i},{i % 3},{i % 2}" for i in range(rows)]
    (t / "t.csv").write_text("\n".join(lines) + "\n")
    return digits(t, data={"dataset": "table", "path": str(t / "t.csv"), **data})


def translation(t: Path, **data) -> str:
    raw = translation_recipe(t)
    raw["data"].update(data)
    return _yaml(t, raw)


def parallel_file(t: Path, text: str, name="pairs.tsv") -> str:
    (t / name).write_text(text)
    return translation(t, path=str(t / name))


def lm(t: Path, data=None, **sections) -> str:
    raw = lm_recipe(t, **sections)
    raw["data"].update(data or {})
    return _yaml(t, raw)


def lm_file(t: Path, rows: list, **data) -> str:
    return lm(t, {"path": str(write_jsonl(t / "rows.jsonl", rows)), **data})


def text(t: Path, student=None, **data) -> str:
    """Sentiment rows with a tiny BERT teacher (its tokenizer) and a BiLSTM student."""
    raw = {"name": "text", "output_dir": str(t / "runs"),
           "data": {"dataset": "text", "path": str(write_sentiment(t / "reviews.jsonl", 120)), "max_length": 32, **data},
           "teacher": {"model": {"kind": "hf", "path": str(make_bert(t / "bert", token_level=False))},
                       "train": {"epochs": 1, "batch_size": 16}},
           "student": {"model": student or {"kind": "bilstm", "embedding_dim": 8, "hidden": 8},
                       "train": {"epochs": 1, "batch_size": 16}}}
    return _yaml(t, raw)


def conll(t: Path, content: str | None = None, **data) -> str:
    folder = write_conll(t / "conll", sizes=(40, 10, 20))
    if content is not None:
        (folder / "train.conll").write_text(content)
    raw = {"name": "tag", "output_dir": str(t / "runs"),
           "data": {"dataset": "conll", "path": str(folder), "max_length": 32, **data},
           "teacher": {"model": {"kind": "hf", "path": str(make_bert(t / "bert", token_level=True, num_labels=5))}},
           "student": {"model": {"kind": "bilstm", "embedding_dim": 8, "hidden": 8}}}
    return _yaml(t, raw)


def _other_words() -> list[str]:
    from text_fixtures import vocab

    words = vocab()
    return words[:5] + sorted(words[5:], reverse=True)  # the same words under other ids


def lm_gpt2s(t: Path) -> str:
    """A GPT-2 teacher and student, each saved with its own tokenizer (same size, other tokens)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lm_fixtures import documents

    for name, texts in (("teacher", None), ("other", [d.upper() for d in documents(200)])):
        tok = make_lm_tokenizer(t / name, texts=texts)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                                   eos_token_id=1)).save_pretrained(t / name)
    raw = lm_recipe(t)
    raw["teacher"] = {"model": {"kind": "hf", "path": str(t / "teacher")}}
    raw["student"]["model"] = {"kind": "hf", "path": str(t / "other")}
    return _yaml(t, raw)


def images(t: Path, size: int) -> str:
    from PIL import Image

    for k in ("a", "b"):
        (t / "img" / k).mkdir(parents=True)
        for i in range(12):
            Image.new("L", (size, size), color=i * 10).save(t / "img" / k / f"{i}.png")
    return digits(t, data={"dataset": "image-folder", "path": str(t / "img"), "image_size": [8, 8]})


def csv(t: Path, text: str) -> str:
    (t / "t.csv").write_text(text)
    return digits(t, data={"dataset": "table", "path": str(t / "t.csv")})


def corrupt_image(t: Path) -> str:
    recipe = images(t, 8)
    (t / "img" / "a" / "3.png").write_bytes(b"not a png")
    return recipe


def saved_table_model(t: Path) -> str:
    """An untrained table classifier (2 features, 2 classes) saved by the API without its data."""
    from distill.api import Distiller
    from distill.students import MLPConfig, build_model

    return str(Distiller(None, build_model(MLPConfig(hidden=[4]), (2,), 2), method="supervised").save(t / "m"))


def teacher_pt(t: Path) -> str:
    torch.save({"w": torch.zeros(3)}, t / "teacher.pt")
    return str(t / "teacher.pt")


def generated(t: Path, partial: bool = False) -> str:
    """A `distill generate` folder written by another teacher (or a half-written one: GEN.partial only)."""
    from distill.generate import FORMAT, MANIFEST

    folder = t / ("gen.partial" if partial else "gen")
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "teacher_sha256": "0" * 64, "data_sha256": "0",
                                               "rows": 1, "decoding": {"k_best": 1}, "shards": []}))
    return str(t / "gen")


_TRAINED: dict[str, Path] = {}


def trained() -> Path:
    """A finished tiny digits run (teacher, scratch, student), trained once for the cases that need one (~2 s)."""
    if "run" not in _TRAINED:
        folder = Path(tempfile.mkdtemp(prefix="distill-bad-inputs-"))
        atexit.register(shutil.rmtree, folder, True)
        raw = tiny_recipe(folder, name="done")
        raw["teacher"]["train"]["epochs"] = raw["student"]["train"]["epochs"] = 1
        assert main(["run", _yaml(folder, raw), "--quiet"]) == 0
        _TRAINED["run"] = folder / "runs" / "done"
    return _TRAINED["run"]


def translation_teacher() -> str:
    """An untrained tiny seq2seq teacher saved as distill saves one (folder, tokenizer, distill.json), made once."""
    if "translation" not in _TRAINED:
        from distill.recipe import validate_recipe
        from distill.tasks import make_task

        folder = trained().parent.parent  # the temporary folder of the trained run
        recipe = validate_recipe(translation_recipe(folder))
        task = make_task(recipe, None)
        data = task.load_data()
        task.save_model(task.build_model(recipe.teacher.model, data), folder / "mt", task.record(recipe.teacher.model, data))
        _TRAINED["translation"] = folder / "mt"
    return str(_TRAINED["translation"])


def teacher(t: Path) -> str:
    return str(trained() / "teacher.safetensors")


def hints(t: Path, student_layer="net.0", teacher_layer="net.0", **extra) -> str:
    return digits(t, distill={"method": "hints", "student_layer": student_layer, "teacher_layer": teacher_layer, **extra})


def bomb(t: Path, monkeypatch) -> str:
    from PIL import Image

    recipe = images(t, 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16 x 16 = 256 pixels: over twice the limit
    return recipe


# ---------------------------------------------------------------------------------------------- the catalogue
# (arguments for `distill` built in the test's folder t, the key phrase of the one-line error)
C = pytest.param
CLI_CASES = [
    # the command line itself
    C(lambda t: [], "required: command", id="no-command"),
    C(lambda t: ["fly"], "invalid choice: 'fly'", id="unknown-command"),
    C(lambda t: ["run", digits(t), "--fast"], "unrecognized arguments: --fast", id="unknown-option"),
    C(lambda t: ["bench", digits(t), "--epochs", "0"], "--epochs: must be a whole number >= 1", id="bench-epochs-0"),
    C(lambda t: ["bench", digits(t), "--rounds", "0"], "--rounds: must be a whole number >= 1", id="bench-rounds-0"),
    C(lambda t: ["bench", digits(t), "--threads", "-1"], "--threads: must be a whole number >= 1", id="bench-threads-negative"),
    C(lambda t: ["bench", digits(t), "--epochs", "two"], "--epochs: must be a whole number", id="bench-epochs-word"),
    C(lambda t: ["bench", lm(t), "--steps", "0"], "--steps: must be a whole number >= 1", id="bench-lm-steps-0"),
    C(lambda t: ["cache", digits(t), "--out", "c", "--top-k", "0"], "--top-k: must be a whole number", id="cache-top-k-0"),
    C(lambda t: ["cache", digits(t), "--out", "c", "--batch-size", "-5"], "--batch-size: must be", id="cache-batch-negative"),
    C(lambda t: ["cache", digits(t)], "required: --out", id="cache-without-out"),
    C(lambda t: ["cache", digits(t), "--out", "c"], "distill cache needs a teacher", id="cache-without-teacher"),
    C(lambda t: ["cache", digits(t), "--out", "c", "--split", "all"], "invalid choice: 'all'", id="cache-bad-split"),
    C(lambda t: ["generate", translation(t), "--out", "g", "--beam", "0"], "--beam: must be", id="generate-beam-0"),
    C(lambda t: ["generate", digits(t), "--out", "g", "--teacher", "x"], "writes translations or language-model",
      id="generate-on-digits"),
    C(lambda t: ["generate", translation(t), "--out", "g", "--teacher", "x", "--beam", "2", "--k-best", "3"],
      "k_best 3 must be at most beam 2", id="generate-more-best-than-beam"),
    C(lambda t: ["generate", translation(t), "--out", "g"], "distill generate needs a teacher", id="generate-without-teacher"),
    C(lambda t: ["export", "runs/none"], "required: --format", id="export-without-format"),
    C(lambda t: ["export", str(t / "nothing"), "--format", "onnx"], "nothing does not exist: give a finished run folder", id="export-missing-run"),
    C(lambda t: ["eval", str(t / "missing.safetensors")], "does not exist", id="eval-missing-checkpoint"),
    C(lambda t: ["eval", teacher_pt(t)], "not a safetensors file", id="eval-pickle"),
    C(lambda t: ["methods", "kd"], "unrecognized arguments: kd", id="methods-with-an-argument"),
    # commands on a trained run
    C(lambda t: ["eval", str(trained() / "student.safetensors"), "data.nope=1"], "unknown key 'data.nope'", id="eval-unknown-override"),
    C(lambda t: ["eval", str(trained() / "student.safetensors"), "student.train.lr=1"], "has no effect on a saved model: only data.key=value", id="eval-non-data-override"),
    C(lambda t: ["export", str(trained()), "--format", "tflite"], "unknown export format 'tflite'", id="export-unknown-format"),
    C(lambda t: ["export", str(trained()), "--format", "onnx", "--quantize", "int4"], "unknown quantization 'int4'", id="export-int4"),
    C(lambda t: ["export", str(trained()), "--format", "onnx", "--role", "nope"], "has no 'nope' model", id="export-unknown-role"),
    C(lambda t: ["distill", digits(t), "--teacher", teacher(t), "data.split_seed=5"], "data.split_seed=0",
      id="teacher-of-another-split"),
    C(lambda t: ["distill", table(t, 60), "--teacher", teacher(t)], "was trained with data.dataset='digits' but the recipe has 'table'", id="teacher-of-another-dataset"),
    C(lambda t: ["distill", digits(t), "--teacher", teacher(t), "teacher.train.lr=1"], "the teacher is loaded",
      id="override-of-a-loaded-teacher"),
    C(lambda t: ["cache", digits(t), "--teacher", teacher(t), "--out", "c", "--features", "nope"], "no layer named 'nope'",
      id="cache-unknown-feature-layer"),
    C(lambda t: ["distill", digits(t), "--teacher", teacher(t), f"teacher.cache={trained()}"], "is not a teacher cache",
      id="cache-folder-that-is-a-run"),
    C(lambda t: ["distill", digits(t), "--teacher", teacher(t), "teacher.precision=fp16",
                 "distill={method: hints, student_layer: net.0, teacher_layer: net.0}"], "teacher.precision: fp32",
      id="hints-with-a-half-teacher"),
    # the recipe file and its overrides
    C(lambda t: ["run", str(t / "absent.yaml")], "not found", id="recipe-missing"),
    C(lambda t: ["run", _write_text(t, "")], "is empty", id="recipe-empty"),
    C(lambda t: ["run", _write_text(t, "# only a comment\n")], "is empty", id="recipe-only-comments"),
    C(lambda t: ["run", _write_text(t, "- a\n- b\n")], "must be a mapping", id="recipe-a-list"),
    C(lambda t: ["run", _write_text(t, "data: [unclosed\n")], "not valid YAML", id="recipe-bad-yaml"),
    C(lambda t: ["run", _write_bytes(t, b"\xff\xfe\x00\x81binary")], "cannot be read as UTF-8", id="recipe-binary"),
    C(lambda t: ["run", digits(t), "distill.temprature=3"], "did you mean 'distill.temperature'", id="override-typo"),
    C(lambda t: ["run", digits(t), "=3"], "is not key=value", id="override-without-key"),
    C(lambda t: ["run", digits(t), "seed.x=1"], "'seed' is a value, not a section", id="override-into-a-value"),
    C(lambda t: ["train", digits(t), "teacher.train.lr=.inf"], "teacher.train.lr: inf is not a finite number", id="lr-inf"),
    C(lambda t: ["run", digits(t), "distill.temperature=.nan"], "distill.temperature: nan is not a finite", id="temperature-nan"),
    C(lambda t: ["run", digits(t), "distill.temperature=0"], "greater than 0", id="temperature-0"),
    C(lambda t: ["run", digits(t), "distill.method=magic"], "unknown method 'magic'", id="unknown-method"),
    C(lambda t: ["run", digits(t), "student.model.kind=resnet"], "unknown kind 'resnet'", id="unknown-model-kind"),
    C(lambda t: ["run", digits(t), "name=../up"], "name: String should match pattern", id="name-with-slash"),
    C(lambda t: ["run", digits(t), "student.model.hidden=[-3]"], "student.model.hidden.0: Input should be greater than 0", id="negative-width"),
    C(lambda t: ["run", digits(t), "student.train.lr=fast"], "valid number", id="lr-not-a-number"),
    C(lambda t: ["train", digits(t), "distill.temperature=3"], "has no effect: this command trains no student",
      id="train-with-distill-override"),
    C(lambda t: ["run", digits(t), "data.val_fraction=0.5", "data.test_fraction=0.5"], "must be below 1", id="fractions-sum-1"),
    C(lambda t: ["run", digits(t), "data.max_length=4"], "data.max_length", id="max-length-below-8"),
    C(lambda t: ["run", digits(t), "teacher.ensemble={checkpoints: [a.safetensors]}"], "at least 2 items",
      id="ensemble-of-one"),
    C(lambda t: ["run", digits(t), "transfer.omit_classes=[12]"], "class 12 is out of range", id="omit-class-out-of-range"),
    # schedules longer than training, found before training
    C(lambda t: ["train", digits(t), "teacher.train.warmup_epochs=10"], "teacher: train.warmup_epochs=10.0 is 200 warm-up",
      id="warmup-epochs-longer-than-training"),
    C(lambda t: ["run", digits(t), "student.train.warmup_steps=60"], "scratch: train.warmup_steps=60 is 60 warm-up steps",
      id="warmup-steps-as-long-as-training"),
    C(lambda t: ["run", digits(t), "distill={method: dkd, warmup_epochs: 5}"], "distill.warmup_epochs=5 but it trains 3",
      id="dkd-ramp-longer-than-training"),
    C(lambda t: ["run", hints(t, hint_epochs=3)], "distill.hint_epochs=3 but it trains 3 epochs, so the KD loss is never added", id="hint-stage-is-all"),
    C(lambda t: ["run", digits(t, variants={"slow": {"student": {"distill_train": {"warmup_steps": 500}}}})],
      "variants.slow: student: train.warmup_steps=500", id="variant-warmup"),
    # layers, shapes and rows, found before training
    C(lambda t: ["run", hints(t, teacher_layer="nope")], "teacher has no layer named 'nope'", id="hints-teacher-layer"),
    C(lambda t: ["run", hints(t, student_layer="net.9")], "student has no layer named 'net.9'", id="hints-student-layer"),
    C(lambda t: ["run", digits(t, distill={"method": "attention", "student_layers": ["net.0"], "teacher_layers": []})],
      "teacher_layers", id="attention-no-teacher-layers"),
    C(lambda t: ["run", digits(t, distill={"method": "attention", "student_layers": ["net.0"], "teacher_layers": ["net.0"]})],
      "attention transfer needs 4-D (N, C, H, W) activations", id="attention-on-mlp-layers"),
    C(lambda t: ["run", digits(t, variants={"h": {"distill": {"method": "hints", "student_layer": "net.1",
                                                              "teacher_layer": "net.7"}}})],
      "variants.h: teacher has no layer named 'net.7'", id="variant-hints-layer"),
    C(lambda t: ["run", table(t, 3)], "split has", id="table-of-3-rows"),
    C(lambda t: ["run", table(t, 30)], "the val split has 3 rows; it needs at least 5", id="table-too-few-val-rows"),
    C(lambda t: ["run", table(t, 60, label_column="kind")], "Label column 'kind' is not in", id="table-missing-label-column"),
    C(lambda t: ["run", digits(t, data={"dataset": "table"})], "needs a path", id="table-without-path"),
    C(lambda t: ["run", digits(t, data={"dataset": "image-folder", "path": str(t / "nowhere")})], "does not exist",
      id="image-folder-missing"),
    C(lambda t: ["run", digits(t), "--resume", "name=never"], "no killed run to continue", id="resume-without-a-run"),
    C(lambda t: ["distill", digits(t)], "distilling needs a teacher: pass --teacher", id="distill-without-teacher"),
    C(lambda t: ["distill", digits(t), "--teacher", teacher_pt(t)], "not a safetensors file", id="teacher-pickle"),
    C(lambda t: ["distill", digits(t), "--teacher", str(t / "none.safetensors")], "does not exist", id="teacher-missing"),
    C(lambda t: ["run", digits(t), f"output_dir={_write_text(t, 'x', 'afile')}"], "cannot write the run folder",
      id="output-dir-is-a-file"),
    C(lambda t: ["run", table(t, 60), "transfer.rows=heldout", "transfer.heldout_fraction=0.95"],
      "teacher would train on 2 rows; it needs at least 10", id="heldout-leaves-the-teacher-no-rows"),
    C(lambda t: ["train", digits(t), "teacher.train.max_steps=5", "teacher.train.warmup_steps=5"],
      "train.warmup_steps=5 is 5 warm-up steps, not shorter than the whole training (5", id="warmup-as-long-as-max-steps"),
    C(lambda t: ["run", digits(t), "assistants=[{model: {hidden: [32]}, train: {epochs: 1, warmup_epochs: 5}}]"],
      "assistants[0]: train.warmup_epochs=5.0", id="assistant-warmup"),
    C(lambda t: ["run", digits(t), "variants={a: {student: {model: {hidden: [3]}}}}"], "variants.a.student.model: a variant",
      id="variant-changes-the-network"),
    C(lambda t: ["distill", digits(t), "teacher.ensemble={checkpoints: [a.safetensors, b.safetensors]}"],
      "a.safetensors does not exist", id="ensemble-of-missing-files"),
    C(lambda t: ["run", csv(t, "")], "as CSV (No columns to parse", id="csv-empty"),
    C(lambda t: ["run", csv(t, "a,b,label\n" + "".join(f"x{i},{i},{i % 2}\n" for i in range(60)))],
      "Feature column 'a'", id="csv-text-feature"),
    C(lambda t: ["run", csv(t, "a,b,label\n" + "".join(f",{i},{i % 2}\n" for i in range(60)))],
      "has 60 missing or infinite value(s)", id="csv-missing-values"),
    C(lambda t: ["run", csv(t, "a,b,label\n" + "".join(f"{i},{i},0\n" for i in range(60)))],
      "has 1 distinct value(s): a classifier needs at least 2 classes", id="csv-one-class"),
    C(lambda t: ["run", table(t, 60), "data.feature_columns=[zz]"], "Feature column(s) 'zz' not in", id="csv-unknown-feature"),
    C(lambda t: ["run", corrupt_image(t)], "3.png (UnidentifiedImageError", id="image-corrupt"),
    C(lambda t: ["eval", str(t)], "has no distill.json", id="eval-a-folder-of-nothing"),
    C(lambda t: ["eval", saved_table_model(t), "data.dataset=table", f"data.path={table(t, 20) and t / 't.csv'}"],
      "table: the test split has 4 rows; it needs at least 10 for a test score", id="eval-on-a-tiny-test-split"),
    C(lambda t: ["export", str(t), "--format", "onnx"], "is neither a finished run", id="export-a-folder-of-nothing"),
    # translation
    C(lambda t: ["run", parallel_file(t, "source\ttarget\nthe film\tla película\nno tab here\n")],
      "line 3: 1 tab-separated column", id="tsv-line-without-tab"),
    C(lambda t: ["run", parallel_file(t, '{"source": "a", "target": "b"}\n{"source": \n', "pairs.jsonl")],
      "line 2: not valid JSON", id="parallel-jsonl-bad-line"),
    C(lambda t: ["run", parallel_file(t, "en\tes\nthe film\tla película\n")], "no column 'source'", id="tsv-wrong-header"),
    C(lambda t: ["run", translation(t), f"data.targets={generated(t)}"], "distil from that teacher",
      id="targets-of-another-teacher"),
    C(lambda t: ["distill", translation(t), "--teacher", translation_teacher(), f"data.targets={generated(t)}"],
      "was generated by another teacher", id="generate-folder-of-another-teacher"),
    C(lambda t: ["distill", translation(t), "--teacher", translation_teacher(), f"data.targets={generated(t, True)}"],
      "is unfinished (gen.partial)", id="generate-folder-half-written"),
    C(lambda t: ["distill", digits(t), "--teacher", translation_teacher()], "mt is not a file; give the path of a .safetensors",
      id="translation-teacher-for-digits"),
    C(lambda t: ["eval", translation_teacher(), "data.max_length=4"], "data.max_length: Input should be greater than or equal to 8",
      id="eval-bad-data-override"),
    C(lambda t: ["run", translation(t), "student.model={kind: mlp, hidden: [8]}"], "model.kind mlp does not translate", id="translation-with-mlp"),
    C(lambda t: ["run", translation(t), "generate.sample=true"], "generate.sample and temperature apply to language models",
      id="translation-sampling"),
    # text classification and tagging
    C(lambda t: ["run", text(t, label_column="stars")], "no column 'stars'", id="text-missing-label-column"),
    C(lambda t: ["run", text(t), "student.train.jitter=2"], "inputs are token ids", id="text-jitter"),
    C(lambda t: ["run", text(t), "distill.method=sobolev"], "perturbs or differentiates the inputs", id="text-sobolev"),
    C(lambda t: ["run", text(t, student={"kind": "hf", "path": str(make_bert(t / "other", tokenizer_words=_other_words()))})],
      "has its own tokenizer, different from the teacher", id="text-student-with-another-tokenizer"),
    C(lambda t: ["run", conll(t, "John B-PER\nlives\nin O\n")], "has no tag", id="conll-line-without-tag"),
    C(lambda t: ["run", conll(t, "\n\n")], "holds no sentences", id="conll-empty"),
    # language models
    C(lambda t: ["run", lm(t, {"path": _write_text(t, '{"text": "the film"}\n{not json\n', "rows.jsonl")})],
      "rows.jsonl line 2: not valid JSON", id="lm-jsonl-bad-line"),
    C(lambda t: ["run", lm_file(t, [{"text": "the film"}, {"text": ""}])], "line 2: needs a non-empty 'text' string",
      id="lm-jsonl-empty-text"),
    C(lambda t: ["run", lm_file(t, [{"prompt": "the film " * 40, "completion": " was good ."}] * 30)],
      "no room for its completion", id="lm-prompt-longer-than-context"),
    C(lambda t: ["run", lm_file(t, [{"messages": [{"role": "user", "content": "the film"},
                                                 {"role": "assistant", "content": "was good"}]}] * 30)],
      "chat template", id="lm-chat-without-template"),
    C(lambda t: ["run", lm_gpt2s(t)], "has its own tokenizer, different from the teacher's", id="lm-mismatched-tokenizers"),
    C(lambda t: ["run", lm(t, {"path": _write_text(t, "the film was good .\nthe plot .\nok .\n", "e.txt")})],
      "the val split has no examples", id="lm-three-documents"),
    C(lambda t: ["run", lm(t, {"path": _write_text(t, "", "e.txt")})], "holds no examples", id="lm-empty-file"),
    C(lambda t: ["run", lm(t), "student.model.max_positions=16"], "takes at most 16 positions", id="lm-context-too-short"),
    C(lambda t: ["run", lm(t), "data.pack=true", "data.targets=auto"], "packed blocks have none", id="lm-pack-with-targets"),
    C(lambda t: ["run", lm(t), "data.target_choice=closest"], "target_choice: closest picks a translation",
      id="lm-closest-targets"),
    C(lambda t: ["generate", lm(t), "--out", "g", "--teacher", "x", "data.pack=true"], "packed blocks have none",
      id="generate-packed"),
]


def _write_text(t: Path, content: str, name="recipe.yaml") -> str:
    (t / name).write_text(content)
    return str(t / name)


def _write_bytes(t: Path, content: bytes, name="recipe.yaml") -> str:
    (t / name).write_bytes(content)
    return str(t / name)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _refuse_training(*args, **kwargs):
    raise AssertionError("training started: this bad input should have been refused before")


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # what building the inputs printed
    code = main(args)  # argparse's refusals too: an exit status, not SystemExit
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_one_line(code, out, err, phrase):
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("distill: error: "), err
    assert phrase in lines[0], lines[0]
    assert "Traceback" not in out + err


@pytest.mark.parametrize("make_args, phrase", CLI_CASES)
def test_bad_input_is_one_line(make_args, phrase, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = make_args(tmp_path)
    before = _files(tmp_path), _files(trained())
    monkeypatch.setattr(distill.train._Training, "run", _refuse_training)
    code, out, err = _run_cli(args, capsys)
    _assert_one_line(code, out, err, phrase)
    assert (_files(tmp_path), _files(trained())) == before  # nothing half-written


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, capsys, monkeypatch):
    recipe = bomb(tmp_path, monkeypatch)
    monkeypatch.setattr(distill.train._Training, "run", _refuse_training)
    code, out, err = _run_cli(["run", recipe], capsys)
    _assert_one_line(code, out, err, "may be a decompression bomb")
    assert str(tmp_path / "img" / "a" / "0.png") in err


def test_an_image_just_over_the_limit_is_refused_too(tmp_path, monkeypatch):
    """Between MAX_IMAGE_PIXELS and twice it Pillow only warns; distill refuses those as well."""
    from PIL import Image

    from distill.data.images import read_image

    Image.new("L", (12, 12)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: a warning in Pillow
    with pytest.raises(UserError, match="decompression bomb"):
        read_image(tmp_path / "big.png", (8, 8), True)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="is empty"):
        main(["run", _write_text(tmp_path, ""), "--debug"])


# ---------------------------------------------------------------------------------------------- the Python API
def _mlp():
    from distill.students import MLPConfig, build_model

    return build_model(MLPConfig(hidden=[8]), (64,), 10)


def _rows(n=40):
    from distill.data import ArrayDataset

    return ArrayDataset(torch.randn(n, 64), torch.arange(n) % 10)


def _fit(**train):
    from distill.api import Distiller

    Distiller(_mlp(), _mlp(), "kd").fit(_rows(), **train)


def _api_validate(raw):
    from distill.recipe import validate_recipe

    validate_recipe(raw)


def _api_distiller(*args, **kwargs):
    from distill.api import Distiller

    Distiller(*args, **kwargs)


def _api_run(t: Path, **overrides):
    from distill.recipe import validate_recipe
    from distill.runner import run_recipe

    run_recipe(validate_recipe(tiny_recipe(t, **overrides)), resume=overrides.pop("resume", False), progress=False)


def _api_resume(t: Path):
    from distill.recipe import validate_recipe
    from distill.runner import run_recipe

    run_recipe(validate_recipe(tiny_recipe(t)), resume=True, progress=False)


def _api_load(t: Path):
    import distill

    distill.load(str(t / "none"))


def _api_bench(**kwargs):
    from distill.recipe import validate_recipe
    from distill.speed import bench

    bench(validate_recipe({}), **kwargs)


API_CASES = [
    C(lambda t: _api_distiller(_mlp(), _mlp(), "nope"), "unknown method 'nope'", id="api-unknown-method"),
    C(lambda t: _api_distiller(None, _mlp(), "kd"), "needs a teacher", id="api-kd-without-teacher"),
    C(lambda t: _api_distiller(_mlp(), _mlp(), "kd", temperature=0), "temperature", id="api-temperature-0"),
    C(lambda t: _fit(lr=float("inf")), "train.lr", id="api-fit-lr-inf"),
    C(lambda t: _fit(batch_size=0), "train.batch_size", id="api-fit-batch-0"),
    C(lambda t: _fit(epochs=2, warmup_epochs=3), "warm-up steps", id="api-fit-warmup-too-long"),
    C(lambda t: _api_validate({"data": {"dataset": "nope"}}), "data.dataset", id="api-unknown-dataset"),
    C(lambda t: _api_validate({"teacher": {"train": {"lr": float("nan")}}}), "not a finite number", id="api-recipe-nan"),
    C(lambda t: _api_validate({"distill": {"method": "kd", "temperature": float("inf")}}), "distill.temperature",
      id="api-temperature-inf"),
    C(lambda t: _api_resume(t), "no killed run", id="api-resume-without-a-run"),
    C(lambda t: _api_run(t, distill={"method": "hints", "student_layer": "x", "teacher_layer": "net.0"}),
      "student has no layer named 'x'", id="api-hints-layer"),
    C(lambda t: _api_load(t), "holds no model.safetensors", id="api-load-missing"),
    C(lambda t: _api_bench(epochs=0), "bench: epochs must be a whole number >= 1", id="api-bench-epochs-0"),
    C(lambda t: _api_bench(threads=-1), "bench: threads must be a whole number >= 1", id="api-bench-threads"),
]


@pytest.mark.parametrize("call, phrase", API_CASES)
def test_bad_api_input_is_one_line(call, phrase, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(distill.train._Training, "run", _refuse_training)
    before = _files(tmp_path)
    with pytest.raises(UserError) as e:
        call(tmp_path)
    assert phrase in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert _files(tmp_path) == before


def test_the_catalogue_is_long_enough():
    assert len(CLI_CASES) + len(API_CASES) + 2 >= 60
    ids = [c.id for c in CLI_CASES + API_CASES]
    assert len(ids) == len(set(ids))
