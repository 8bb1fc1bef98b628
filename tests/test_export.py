"""`distill export`: ONNX and TorchScript files that give PyTorch's logits, their scores and latency in results.json,
int8 quantization, text models with named inputs, and one-line refusals that leave nothing behind."""

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch
import yaml

from conftest import tiny_recipe
from distill.cli import main
from distill.errors import UserError
from distill.export_check import logit_difference, paired_latency

pytest.importorskip("onnxruntime")

ENTRY_KEYS = ["role", "format", "file", "quantization", "runtime", "size_mb", "sha256", "max_abs_diff", "tolerance", "metric",
              "score", "score_pytorch", "latency_ms", "latency_ms_pytorch", "latency_batch"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny digits run (MLP teacher [128], MLP student [16]), trained once for the module."""
    root = tmp_path_factory.mktemp("export-run")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(root)))
    assert main(["run", str(recipe), "--quiet"]) == 0
    return root / "runs" / "tiny"


@pytest.fixture
def run(trained_run, tmp_path):
    """A private copy of the run: every test may add exports to it."""
    return shutil.copytree(trained_run, tmp_path / "tiny")


def _results(run):
    return json.loads((run / "results.json").read_text())


def _export(capsys, *args):
    capsys.readouterr()
    code = main(["export", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_export_gives_pytorchs_logits_and_is_recorded_in_the_run(run, capsys, monkeypatch, fmt, suffix):
    import distill.report

    rendered = []
    write_report = distill.report.write_report
    monkeypatch.setattr(distill.report, "write_report", lambda d, r, h: rendered.append(r) or write_report(d, r, h))
    code, out, _ = _export(capsys, run, "--format", fmt)
    assert code == 0
    path = run / "export" / f"student{suffix}"
    assert path.is_file() and f"export/student{suffix}" in out and "speed-up" in out
    exports = _results(run)["exports"]
    assert len(exports) == 1 and list(exports[0]) == ENTRY_KEYS
    e = exports[0]
    assert e["role"] == "student" and e["format"] == fmt and e["file"] == f"export/student{suffix}"
    assert e["quantization"] is None and e["tolerance"] == 1e-5 and e["latency_batch"] == 1
    assert e["runtime"].startswith("onnxruntime 1." if fmt == "onnx" else "torch 2.")
    assert e["size_mb"] == path.stat().st_size / 1e6 and e["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert 0 <= e["max_abs_diff"] <= 1e-5 and e["metric"] == "accuracy"
    # the exported model's test score, through its own runtime, is the score the run measured in PyTorch
    assert e["score"] == e["score_pytorch"] == _results(run)["models"]["student"]["score"]
    for lat in (e["latency_ms"], e["latency_ms_pytorch"]):
        assert 0 < lat["min"] <= lat["median"] <= lat["max"]
    assert rendered and rendered[-1]["exports"] == exports  # report.md rendered again with the entry
    assert not [p for p in (run / "export").iterdir() if p.name.startswith(".")]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's private 0600

    assert _export(capsys, run, "--format", fmt)[0] == 0  # the same export again replaces its entry
    assert len(_results(run)["exports"]) == 1


def test_onnx_inputs_have_a_dynamic_batch_axis_and_run_on_torchs_thread_count(run, capsys):
    from distill.export_formats import load_exported

    assert _export(capsys, run, "--format", "onnx")[0] == 0
    torch.set_num_threads(2)
    try:
        session = load_exported(run / "export" / "student.onnx", "onnx", torch.zeros(1, 1, 8, 8)).session
    finally:
        torch.set_num_threads(1)
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.shape == ["batch", 1, 8, 8]
    assert session.get_session_options().intra_op_num_threads == 2


def test_latency_takes_turns_with_the_first_one_alternating():
    calls = []
    exported, pytorch = paired_latency(lambda: calls.append("p"), lambda: calls.append("e"), warmup=1, repeats=4)
    assert calls == ["p", "e"] + ["p", "e", "e", "p"] * 2
    assert set(exported) == set(pytorch) == {"min", "median", "max"} and exported["min"] <= exported["max"]


def test_a_file_that_differs_from_pytorch_is_refused_and_not_left_behind(run, capsys, monkeypatch):
    import distill.export

    write = distill.export.write_export

    def write_then_perturb(model, *args):
        write(model, *args)
        with torch.no_grad():
            list(model.parameters())[-1][0] += 1e-3  # an output bias: the file keeps the old one, its logits differ

    monkeypatch.setattr(distill.export, "write_export", write_then_perturb)
    before = (run / "results.json").read_bytes()
    code, _, err = _export(capsys, run, "--format", "onnx")
    assert code == 2 and len(err.splitlines()) == 1 and "away from PyTorch's" in err and "nothing written" in err
    assert not (run / "export").exists() and (run / "results.json").read_bytes() == before


def test_tolerance_is_absolute_for_small_logits_and_relative_for_large_ones():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits

    small, large = torch.tensor([[0.5, -0.5]]), torch.tensor([[100.0, -100.0]])
    assert logit_difference(Fixed(small), Fixed(small + 9e-6), [None]) == (pytest.approx(9e-6, rel=1e-2), True)
    assert logit_difference(Fixed(small), Fixed(small + 2e-5), [None])[1] is False
    assert logit_difference(Fixed(large), Fixed(large + 5e-4), [None])[1] is True  # within 1e-5 + 1e-5 * 100
    assert logit_difference(Fixed(large), Fixed(large + 2e-3), [None])[1] is False
    assert logit_difference(Fixed(small), Fixed(torch.tensor([[0.5]])), [None]) == (float("inf"), False)


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_int8_is_smaller_and_reports_its_score_and_difference(run, capsys, fmt, suffix):
    assert _export(capsys, run, "--role", "teacher", "--format", fmt)[0] == 0
    assert _export(capsys, run, "--role", "teacher", "--format", fmt, "--quantize", "int8")[0] == 0
    fp32, int8 = _results(run)["exports"]
    assert int8["file"] == f"export/teacher.int8{suffix}" and int8["quantization"] == "int8" and int8["tolerance"] is None
    # weights at a quarter of their bytes; a TorchScript file also carries its code (~15 kB), which does not shrink
    assert int8["size_mb"] < (0.5 if fmt == "onnx" else 0.75) * fp32["size_mb"]
    assert 0 < int8["max_abs_diff"] < 0.5  # really quantized, and still close
    assert abs(int8["score"] - int8["score_pytorch"]) < 0.03 and int8["score_pytorch"] == fp32["score"]


def test_one_checkpoint_is_exported_beside_itself_and_the_run_is_left_alone(run, capsys, tmp_path):
    before = (run / "results.json").read_bytes()
    code, out, _ = _export(capsys, run / "student.safetensors", "--format", "onnx")
    assert code == 0 and (run / "student.onnx").is_file() and (run / "results.json").read_bytes() == before
    code, out, _ = _export(capsys, run, "--format", "torchscript", "--out", tmp_path / "shipped" / "s.pt")
    assert code == 0 and (tmp_path / "shipped" / "s.pt").is_file()
    assert _results(run)["exports"][0]["file"] == str((tmp_path / "shipped" / "s.pt").resolve())
    code, out, _ = _export(capsys, run, "--format", "onnx", "--out", f"{tmp_path / 'folder'}/")  # a folder: default name
    assert code == 0 and (tmp_path / "folder" / "student.onnx").is_file()


# ------------------------------------------------------------------ text models: dict inputs named after their keys
def _text_model(root, kind: str, tagging: bool):
    """An untrained text model of `kind` saved as distill saves one (folder with distill.json), on tiny data."""
    from distill.recipe import validate_recipe
    from distill.tasks import make_task
    from text_fixtures import make_bert, write_conll, write_sentiment

    make_bert(root / "bert", layers=1, hidden=16)
    data = ({"dataset": "conll", "path": str(write_conll(root / "conll", sizes=(40, 10, 120)))} if tagging else
            {"dataset": "text", "path": str(write_sentiment(root / "reviews.jsonl", 200))})
    small = {"embedding_dim": 8, **({"hidden": 8} if kind == "bilstm" else {"channels": 8})}
    model_cfg = {"kind": "hf", "path": str(root / "bert")} if kind == "hf" else {"kind": kind, **small}
    recipe = validate_recipe({"name": "text", "data": {**data, "max_length": 32}, "student": {"model": model_cfg},
                              "teacher": {"model": {"kind": "hf", "path": str(root / "bert")}}})
    task = make_task(recipe)
    data = task.load_data()
    torch.manual_seed(0)
    model = task.build_model(recipe.student.model, data)
    task.save_model(model, root / "student", task.record(recipe.student.model, data))
    return root / "student", recipe


@pytest.mark.parametrize("kind, tagging", [("hf", True), ("hf", False), ("textcnn", False), ("bilstm", True)])
def test_text_models_export_to_onnx_with_named_inputs(tmp_path, kind, tagging):
    import onnxruntime as ort

    from distill.export import export

    folder, _ = _text_model(tmp_path, kind, tagging)
    entry, path, table = export(str(folder), fmt="onnx")
    assert path == tmp_path / "student.onnx" and path.is_file()
    assert entry["max_abs_diff"] <= 1e-5 and entry["score"] == entry["score_pytorch"]
    assert entry["metric"] == ("entity_f1" if tagging else "accuracy")
    inputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    assert [i.name for i in inputs] == ["input_ids", "attention_mask"] + (["word_mask"] if tagging else [])
    assert all(i.shape == ["batch", "sequence"] for i in inputs)


def test_a_text_run_exports_its_model_folder_to_torchscript(tmp_path, capsys):
    from distill.recipe import recipe_to_yaml

    folder, recipe = _text_model(tmp_path / "t", "bilstm", True)
    run = tmp_path / "run"
    run.mkdir()
    shutil.move(folder, run / "student")
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    (run / "results.json").write_text(json.dumps({"recipe": "text", "task": "tagging", "models": {"student": {}}}))
    code, out, _ = _export(capsys, run, "--format", "torchscript")
    assert code == 0 and (run / "export" / "student.pt").is_file()
    e = _results(run)["exports"][0]
    assert e["max_abs_diff"] <= 1e-5 and e["score"] == e["score_pytorch"] and e["metric"] == "entity_f1"


# ------------------------------------------------------------------ refusals: one line, exit 2, nothing written
@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "unknown export format 'tflite'"),
    (["--format", "onnx", "--quantize", "int4"], "unknown quantization 'int4'"),
    (["--format", "onnx", "--role", "assistant1"], "has no 'assistant1' model (it has teacher, scratch, student)"),
])
def test_bad_options_are_refused(run, capsys, args, message):
    before = (run / "results.json").read_bytes()
    code, _, err = _export(capsys, run, *args)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (run / "export").exists() and (run / "results.json").read_bytes() == before


def test_a_run_without_the_roles_model_is_refused(run, capsys):
    (run / "student.safetensors").unlink()
    code, _, err = _export(capsys, run, "--format", "onnx")
    assert code == 2 and len(err.splitlines()) == 1 and "no saved student model" in err
    assert not (run / "export").exists()


@pytest.mark.parametrize("module", ["onnx", "onnxruntime"])
def test_missing_onnx_packages_are_refused_with_their_pins(run, capsys, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    code, _, err = _export(capsys, run, "--format", "onnx")
    assert code == 2 and len(err.splitlines()) == 1 and f"({module} is missing)" in err
    assert "onnx==1.23.2 onnxruntime==1.32.0" in err
    assert not (run / "export").exists()


def test_an_output_folder_that_cannot_be_written_is_refused(run, capsys):
    (run / "blocker").write_text("a file, not a folder")
    code, _, err = _export(capsys, run, "--format", "onnx", "--out", run / "blocker" / "student.onnx")
    assert code == 2 and len(err.splitlines()) == 1 and "cannot write in" in err and "--out" in err
    assert "exports" not in _results(run)


def test_a_path_that_is_neither_run_nor_model_is_refused(tmp_path):
    from distill.export import export

    with pytest.raises(UserError, match="does not exist"):
        export(str(tmp_path / "nothing"), fmt="onnx")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="neither a finished run"):
        export(str(tmp_path / "half"), fmt="onnx")
