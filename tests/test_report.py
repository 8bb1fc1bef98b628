import json
import math

import pytest
import torch
from torch import nn

from distill.plots import plot_accuracy_vs_size, plot_training_curves
from distill.report import (
    count_parameters,
    format_table,
    measure_latency,
    measure_throughput,
    model_card,
    size_mb,
    write_report,
    write_results,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- counting
def test_linear_params_and_size():
    m = nn.Linear(784, 10)
    assert count_parameters(m) == 7850
    assert size_mb(m, 4) == pytest.approx(0.0314)
    assert size_mb(m, 2) == pytest.approx(0.0157)


def test_batchnorm_buffers_counted_and_int_buffer_at_own_itemsize():
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    # params: 4*8+8 + 8+8 = 56; float buffers: running_mean 8 + running_var 8 = 16; int64 num_batches_tracked: 8 bytes
    assert count_parameters(m) == 56
    assert size_mb(m, 4) == pytest.approx(((56 + 16) * 4 + 8) / 1e6)
    assert size_mb(m, 2) == pytest.approx(((56 + 16) * 2 + 8) / 1e6)


def test_tied_weights_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 16)
            self.out = nn.Linear(16, 100, bias=False)
            self.out.weight = self.emb.weight

    m = Tied()
    assert count_parameters(m) == 1600
    assert size_mb(m, 4) == pytest.approx(1600 * 4 / 1e6)
    shared = nn.Linear(3, 3)
    assert count_parameters(nn.Sequential(shared, shared)) == 12


# ----------------------------------------------------------------------------- timing
def test_latency_positive_restores_flag_and_big_is_slower():
    tiny = nn.Linear(10, 10)
    big = nn.Sequential(*[nn.Sequential(nn.Linear(2048, 2048), nn.ReLU()) for _ in range(4)])
    big.train()
    big[1].eval()  # mixed flags must come back exactly
    t_tiny = measure_latency(tiny, torch.randn(10), batch_size=64, warmup=1, repeats=5)
    t_big = measure_latency(big, torch.randn(2048), batch_size=64, warmup=1, repeats=5)
    assert isinstance(t_tiny, float) and t_tiny > 0
    assert t_big > t_tiny
    assert big.training and big[0].training and not big[1].training and big[2].training
    assert tiny.training  # default flag restored


def test_throughput_and_model_card():
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)).train()
    thr = measure_throughput(m, torch.randn(8), batch_size=32, warmup=1, repeats=3)
    assert thr > 0 and m.training
    card = model_card(m, torch.randn(8), latency_batch=4, throughput_batch=16, repeats=3)
    assert set(card) == {"params", "size_mb_fp32", "size_mb_fp16", "latency_ms", "throughput_per_s"}
    assert card["params"] == count_parameters(m)
    assert card["size_mb_fp16"] < card["size_mb_fp32"]
    assert card["latency_ms"] > 0 and card["throughput_per_s"] > 0
    with pytest.raises(ValueError):
        measure_latency(m, torch.randn(8), repeats=0)


# ----------------------------------------------------------------------------- writing
def _results():
    def card(acc, errors, params, lat, train_s):
        return {"metric": "accuracy", "score": acc, "accuracy": acc, "errors": errors, "test_size": 360,
                "params": params, "size_mb_fp32": params * 4 / 1e6, "size_mb_fp16": params * 2 / 1e6,
                "latency_ms": lat, "throughput_per_s": 12345.6, "train_seconds": train_s, "epochs": 3}

    return {"recipe": "digits-default", "task": "classification", "dataset": "digits",
            # teacher deliberately not first: it must still come first
            "models": {"scratch": card(0.95, 18, 100_000, 0.5, 5.0),
                       "teacher": card(0.98, 7, 1_000_000, 2.0, 30.0),
                       "student": card(0.97, 11, 100_000, 0.5, 6.0)},
            "config": {"epochs": 3, "temperature": 4.0}}


def _histories():
    return {"scratch": [{"epoch": e, "train_loss": 1.0 / e, "val_accuracy": 0.8 + e / 100} for e in range(1, 4)],
            "student": [{"epoch": e, "train_loss": 1.2 / e, "val_accuracy": 0.82 + e / 100} for e in range(1, 4)]}


def _row(text, role):
    return next(line for line in text.splitlines() if line.startswith(f"| {role} |"))


def test_write_results_roundtrip_and_order(tmp_path):
    res = _results()
    res["models"]["student"]["nan_field"] = float("nan")
    path = write_results(tmp_path / "run", res)
    assert path == tmp_path / "run" / "results.json"
    loaded = json.loads(path.read_text())
    assert list(loaded["models"]) == ["teacher", "scratch", "student"]
    assert loaded["models"]["teacher"] == res["models"]["teacher"]
    assert loaded["config"] == res["config"] and loaded["recipe"] == "digits-default"
    assert loaded["models"]["student"]["nan_field"] is None  # strict JSON
    assert "\n  " in path.read_text()  # indent 2
    assert not [p for p in path.parent.iterdir() if p.name != "results.json"]  # no temp files left


def test_write_report_table_summary_and_images(tmp_path):
    path = write_report(tmp_path, _results(), _histories())
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert "digits-default" in text and "digits" in text and "classification" in text
    teacher, scratch, student = (_row(text, r) for r in ("teacher", "scratch", "student"))
    assert text.index("| teacher |") < text.index("| scratch |") < text.index("| student |")
    cells = [c.strip() for c in student.strip("|").split("|")]
    # model, params M, fp32, fp16, acc %, errors, latency, throughput, speed-up, compression, train s
    assert cells == ["student", "0.100", "0.400", "0.200", "97.00", "11", "0.500", "12,346", "4.0", "10.0", "6.0"]
    assert [c.strip() for c in teacher.strip("|").split("|")][8:10] == ["1.0", "1.0"]
    assert "speed-up" in text and "compression" in text
    assert "7 fewer test errors" in text and "(11 vs 18)" in text
    assert "99.0% of the teacher's accuracy" in text and "1/10 of its parameters" in text and "4.0× faster" in text
    assert "![Training curves](curves.png)" in text and "![Accuracy vs size](accuracy_vs_size.png)" in text
    assert f"CPU threads = {torch.get_num_threads()}" in text
    for name in ("curves.png", "accuracy_vs_size.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_vs_size.png", "curves.png", "report.md"]
    assert format_table(_results()).splitlines()[2].split()[0] == "teacher"


def test_student_worse_is_worded_honestly(tmp_path):
    res = _results()
    res["models"]["student"].update(errors=25, accuracy=0.93, latency_ms=4.0)
    text = write_report(tmp_path, res, {}).read_text()
    assert "7 more test errors" in text and "(25 vs 18)" in text and "fewer" not in text
    assert "did not reduce" in text and "2.0× slower" in text
    res["models"]["student"]["errors"] = 18
    res["config"]["report"] = {"latency_batch": 4, "throughput_batch": 64, "repeats": 9}
    text = write_report(tmp_path, res, {}).read_text()
    assert "as many test errors as the same network trained alone (18 vs 18)" in text
    assert "latency ms/sample (batch 4)" in text and "samples/s (batch 64)" in text and "over 9 repeats" in text


def test_missing_fields_render_dash_and_no_histories(tmp_path):
    res = {"models": {"student": {"params": 5000}, "scratch": {"accuracy": 0.9}, "odd": "not a dict"}}
    path = write_report(tmp_path, res, {})
    text = path.read_text()
    student = [c.strip() for c in _row(text, "student").strip("|").split("|")]
    assert student[0] == "student" and student[1] == "0.005" and student[2:] == ["-"] * 9
    assert "# Distillation report: -" in text
    assert not (tmp_path / "curves.png").exists() and "curves.png" not in text
    assert (tmp_path / "accuracy_vs_size.png").exists() is False  # no model has both params and accuracy
    assert "-" in format_table(res)
    # completely empty results do not crash either
    write_report(tmp_path / "empty", {}, None)
    assert format_table({}).startswith("model")
    write_results(tmp_path / "empty", {})


def test_plot_helpers_return_none_without_data(tmp_path):
    assert plot_training_curves({}, tmp_path / "c.png") is None
    assert plot_training_curves({"student": [{"epoch": 1}]}, tmp_path / "c.png") is None
    assert plot_accuracy_vs_size({"models": {}}, tmp_path / "a.png") is None
    # partial histories: only loss for one role still plots
    out = plot_training_curves({"student": [{"train_loss": 0.5}, {"train_loss": math.nan}]}, tmp_path / "c.png")
    assert out == tmp_path / "c.png" and out.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*"))  # no temp files left behind

