import json
import re
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
    assert set(card) == {"params", "size_mb_fp32", "size_mb_fp16", "latency_ms", "throughput_per_s", "latency_ms_min",
                         "latency_ms_max", "throughput_per_s_min", "throughput_per_s_max"}
    assert card["params"] == count_parameters(m)
    assert card["size_mb_fp16"] < card["size_mb_fp32"]
    assert card["latency_ms"] > 0 and card["throughput_per_s"] > 0
    # the medians stay under their old names; min <= median <= max
    assert 0 < card["latency_ms_min"] <= card["latency_ms"] <= card["latency_ms_max"]
    assert 0 < card["throughput_per_s_min"] <= card["throughput_per_s"] <= card["throughput_per_s_max"]
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
    assert "99.0% of the teacher's accuracy" in text and "1/10 of its parameters" in text
    assert "4.0× faster than the teacher" in text
    assert "![Training curves](curves.png)" in text and "![Accuracy vs size](accuracy_vs_size.png)" in text
    assert f"CPU threads = {torch.get_num_threads()}" in text
    for name in ("curves.png", "accuracy_vs_size.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_vs_size.png", "curves.png", "report.md"]
    assert format_table(_results()).splitlines()[3].split()[0] == "teacher"  # two header lines, then the rule


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



# ----------------------------------------------------------------------------- setup, warnings, exports
def _kd_run():
    """_results() as a finished run writes it: the default recipe's config, transfer counts, spreads."""
    from distill.recipe import load_recipe

    res = _results()
    res["config"] = load_recipe(overrides=["student.model.hidden=[64]", "student.distill_train={lr: 0.03, epochs: 30}",
                                           "assistants=[{model: {hidden: [32]}}]", "teacher.cache=auto"]).model_dump(mode="json")
    res["models"]["assistant1"] = {"params": 30_000, "epochs": 20}
    res["transfer"] = {"rows": "train", "teacher_rows": 1293, "student_rows": 1293, "omit_classes": []}
    for m in res["models"].values():
        m.update(latency_ms_min=0.4, latency_ms_max=0.7, throughput_per_s_min=10_000.0, throughput_per_s_max=13_000.0)
    return res


def _section(text, title):
    body = text.split(f"## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def test_setup_names_the_method_its_settings_and_both_architectures(tmp_path):
    text = write_report(tmp_path, _kd_run(), {}).read_text()
    setup = _section(text, "Setup")
    assert text.index("## Setup") < text.index("## Results")
    assert ("- method: **kd**: temperature 4, hard_weight 0.1, soft_weight 0.9, t2_scaling true, pseudo_labels true, "
            "soft_loss kl") in setup
    assert ("- teacher: cnn, channels [32, 64], kernel_size 3, batch_norm true, hidden [256], dropout 0.3 "
            "(1,000,000 parameters); trained: 40 epochs, batch 64, adam, lr 0.001, cosine schedule, jitter 1, ran 3") in setup
    assert "computed once in the run folder (teacher.cache auto)" in setup
    assert ("- assistant1: mlp, hidden [32], activation relu (30,000 parameters); trained: default length (20 epochs, "
            "or more until 1,000 steps), batch 128, adam, lr 0.001, cosine schedule, ran 20") in setup
    assert "- student: mlp, hidden [64], activation relu (100,000 parameters)\n" in setup  # dropout 0 etc. are off
    assert "- scratch (the student's network trained alone): 60 epochs, batch 64, adam, lr 0.003, cosine schedule" in setup
    # distill_train sets epochs and lr; the rest comes from student.train
    assert "- distilled student: 30 epochs, batch 64, adam, lr 0.03, cosine schedule, ran 3 (student.distill_train)" in setup
    assert ("- data: digits, test set 360 rows, teacher trained on 1,293 rows, students learned from 1,293 rows "
            "(transfer.rows train), val_fraction 0.1") in setup
    assert "- seed: 0 (data split seed 0)" in setup


def test_setup_of_a_loaded_teacher_and_without_config(tmp_path):
    res = _kd_run()
    res["config"]["teacher"].update(checkpoint="teachers/cnn.safetensors", cache=None)
    res["config"]["student"]["distill_train"] = None
    setup = _section(write_report(tmp_path, res, {}).read_text(), "Setup")
    assert "(1,000,000 parameters), loaded from teachers/cnn.safetensors (not trained in this run)" in setup
    assert "- distilled student: the same training as scratch (student.train)" in setup
    res["config"]["teacher"].update(checkpoint=None, ensemble={"checkpoints": ["a.safetensors", "b.safetensors"],
                                                               "weights": None, "combine": "logits"})
    setup = _section(write_report(tmp_path, res, {}).read_text(), "Setup")
    assert "- teacher: ensemble of 2 trained teachers (logits averaged): a.safetensors, b.safetensors" in setup
    del res["config"]  # `distill eval` and older runs: no config, no section, no crash
    assert "## Setup" not in write_report(tmp_path, res, {}).read_text()


def test_warnings_follow_the_title_and_the_printed_table():
    res = _results()
    res["warnings"] = ["student does not beat the majority-class baseline (36.0% vs 36.0%)",
                       "teacher and student have the same number of parameters (1.0x)"]
    text = write_report_text(res)
    assert text.startswith("# Distillation report: digits-default\n\n## Warnings\n\n"
                           "- student does not beat the majority-class baseline (36.0% vs 36.0%)\n"
                           "- teacher and student have the same number of parameters (1.0x)\n")
    printed = format_table(res).splitlines()
    assert printed[-2:] == ["warning: student does not beat the majority-class baseline (36.0% vs 36.0%)",
                            "warning: teacher and student have the same number of parameters (1.0x)"]
    assert printed[-3] == "" and printed[-4].startswith("student")
    res["warnings"] = []
    assert "## Warnings" not in write_report_text(res) and "warning:" not in format_table(res)


def write_report_text(res, histories=None):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return write_report(tmp, res, histories or {}).read_text()


def test_exported_models_section():
    res = _results()
    res["exports"] = [
        {"role": "student", "format": "onnx", "file": "exports/student.onnx", "quantization": None,
         "runtime": "onnxruntime 1.20.1", "size_mb": 0.4, "max_abs_diff": 2.4e-6, "tolerance": 1e-4,
         "metric": "accuracy", "score": 0.97, "score_pytorch": 0.97,
         "latency_ms": {"min": 0.05, "median": 0.06, "max": 0.09},
         "latency_ms_pytorch": {"min": 0.1, "median": 0.12, "max": 0.2}, "latency_batch": 1},
        {"role": "student", "format": "onnx", "file": "exports/student.int8.onnx", "quantization": "int8",
         "runtime": "onnxruntime 1.20.1", "size_mb": 0.1, "max_abs_diff": 0.3, "tolerance": 0.1,
         "metric": "accuracy", "score": 0.9694, "score_pytorch": 0.97,
         "latency_ms": {"min": 0.03, "median": 0.04, "max": float("nan")},
         "latency_ms_pytorch": {"min": 0.1, "median": 0.12, "max": 0.2}, "latency_batch": 1}]
    section = _section(write_report_text(res), "Exported models")
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in section.splitlines() if line.startswith("| student")]
    assert rows[0] == ["student", "onnx (onnxruntime 1.20.1)", "none", "`exports/student.onnx`", "0.400", "2.4e-06 (0.0001)",
                       "97.00% vs 97.00%", "0.060 (0.050–0.090) vs 0.120 (0.100–0.200)", "2.00"]
    assert rows[1][2] == "int8" and rows[1][5] == "0.3 (0.1, over)" and rows[1][6] == "96.94% vs 97.00%"
    assert rows[1][7] == "0.040 vs 0.120 (0.100–0.200)" and rows[1][8] == "3.00"  # a NaN max drops the range, no "nan"
    assert "latency ms at batch 1" in section
    del res["exports"]
    assert "## Exported models" not in write_report_text(res)


# ----------------------------------------------------------------------------- noise and wording
def test_accuracy_band_by_hand():
    from distill.report_text import accuracy_band

    # 1.96 * sqrt(0.97*0.03/360 + 0.95*0.05/360) = 1.96 * sqrt(0.0766/360) = 0.02859
    assert accuracy_band(0.97, 360, 0.95, 360) == pytest.approx(0.02859, abs=1e-5)
    # 1.96 * sqrt(0.97*0.03/1000 + 0.9*0.1/1000) = 1.96 * 0.010913 = 0.02139
    assert accuracy_band(0.97, 1000, 0.90, 1000) == pytest.approx(0.02139, abs=1e-5)


def _pair(student, scratch, teacher=None, n=360, metric="accuracy"):
    card = lambda q: {"metric": metric, "score": q, **({"accuracy": q} if metric == "accuracy" else {}), "test_size": n}
    models = {"scratch": card(scratch), "student": card(student)}
    return {"models": {**({"teacher": card(teacher)} if teacher is not None else {}), **models}}


def test_a_difference_within_the_test_set_noise_is_called_so():
    from distill.report import distillation_summary

    inside = distillation_summary(_pair(0.97, 0.95))  # +2.0 points, band ±2.9 (see test_accuracy_band_by_hand)
    assert ("Against the network trained alone, the difference, +2.0 points, is within the noise of a 360-row test "
            "set (±2.9 points, 95%): this run cannot tell the two apart.") in inside
    outside = distillation_summary(_pair(0.97, 0.90, teacher=0.98, n=1000))  # +7.0 points, band ±2.1
    assert ("Against the network trained alone, the difference, +7.0 points, is larger than the noise of a 1,000-row "
            "test set (±2.1 points, 95%).") in outside
    assert "Against the teacher, the difference, -1.0 points, is within the noise" in outside
    assert "cannot tell" not in outside.split("Against the teacher")[0]


def test_several_seeds_give_the_observed_spread_and_f1_is_not_estimated():
    from distill.report import distillation_summary

    res = _pair(0.97, 0.96)
    # paired differences 0.010, 0.013, 0.014: mean 0.01233, sd 0.002082; t(0.975, 2) = 4.303 -> ±0.00517
    res["seeds"] = {"student": [0.970, 0.975, 0.972], "scratch": [0.960, 0.962, 0.958]}
    text = distillation_summary(res)
    assert "the difference, +1.2 points, is larger than the noise of 3 seeds (paired, ±0.5 points, 95%)." in text
    f1 = distillation_summary(_pair(0.81, 0.80, metric="entity_f1"))
    assert "the difference is +0.01 entity f1; its noise is not estimated" in f1 and "within" not in f1


@pytest.mark.parametrize("student, expected, absent", [
    ({"errors": 17}, "makes 1 fewer test error than the same network trained alone (17 vs 18)", "errors than"),
    ({"errors": 19}, "makes 1 more test error than the same network trained alone (19 vs 18)", "errors than"),
    ({"errors": 20}, "makes 2 more test errors than", "fewer"),
    ({"errors": 18}, "makes as many test errors as the same network trained alone (18 vs 18)", "more"),
    ({"latency_ms": 1.94}, "runs about as fast as the teacher (1.03×)", "1.0× faster"),
    ({"latency_ms": 2.06}, "runs about as fast as the teacher (0.97×)", "slower"),
    ({"latency_ms": 4.0}, "runs 2.0× slower than the teacher", "faster"),
    ({"params": 1_000_000}, "accuracy at the same size as the teacher", "1/1.0"),
    ({"params": 980_000}, "accuracy at about the teacher's size (compression 1.02×)", "1/1.0"),
    ({"params": 2_000_000}, "accuracy with 2.0× the teacher's parameters", "0.5"),
    ({"params": 400_000}, "accuracy at 1/2.5 of its parameters", "same size"),
    ({"latency_ms_min": 1.0, "latency_ms_max": 3.0}, "runs 4.0× faster than the teacher (their latency ranges overlap: "
                                                     "within timing noise)", "about as fast"),
])
def test_summary_wording(student, expected, absent):
    from distill.report import distillation_summary

    res = _results()
    res["models"]["teacher"].update(latency_ms_min=1.5, latency_ms_max=2.5)
    res["models"]["student"].update(student)
    text = distillation_summary(res)
    assert expected in text and absent not in text


def test_omitted_classes_section_has_no_nan():
    from distill.report import omitted_classes_section

    res = {"models": {"student": {"errors": float("nan"), "bias_correction": float("nan"),
                                  "omitted_class_errors": {"3": {"errors": 4, "n": 36}}},
                      "student+bias": {"errors": 9, "bias_correction": 2.5,
                                       "omitted_class_errors": {"3": {"errors": 1, "n": 36}}}}}
    lines = omitted_classes_section(res)
    assert "| student | 4 / 36 | - | - |" in lines and "| student+bias | 1 / 36 | 9 | 2.50 |" in lines


# ----------------------------------------------------------------------------- curves and missing values
def _kd_histories(val=True):
    def row(e, **parts):
        extra = {"val_accuracy": 0.8 + e / 100, "val_loss": 0.5 / e} if val else {}
        return {"epoch": e, "train_loss": sum(w * v for w, v in parts.values()), "lr": 0.1, "seconds": 1.0,
                **{f"train_{k}": v for k, (_, v) in parts.items()}, **extra}
    return {"teacher": [row(e, hard=(1, 1 / e)) for e in (1, 2, 3)],
            "scratch": [row(e, hard=(1, 1.1 / e)) for e in (1, 2, 3)],
            "student": [row(e, hard=(0.1, 1.2 / e), soft=(0.9, 0.4 / e)) for e in (1, 2, 3)]}


def test_one_panel_per_loss_term():
    from distill.plots import curve_panels

    panels = dict(curve_panels(_kd_histories()))
    assert list(panels) == ["val_accuracy", "val_loss", "train_loss", "train_hard", "train_soft"]
    assert "not comparable" in panels["train_loss"] and "cross-entropy" in panels["val_loss"]
    assert "soft" in panels["train_soft"] and "unweighted" in panels["train_hard"]


def test_without_validation_rows_no_validation_panel_and_no_nan(tmp_path):
    from distill.plots import curve_panels

    histories = _kd_histories(val=False)
    histories["student"][0]["val_accuracy"] = float("nan")  # a NaN is no figure
    assert [k for k, _ in curve_panels(histories)] == ["train_loss", "train_hard", "train_soft"]
    res = _kd_run()
    res["models"]["student"].update(accuracy=float("nan"), score=float("nan"), latency_ms=float("nan"),
                                    latency_ms_max=float("inf"), throughput_per_s=float("nan"), errors=float("nan"))
    res["models"]["teacher"]["size_mb_fp16"] = float("nan")
    text = write_report(tmp_path, res, histories).read_text()
    assert "No validation split: the last epoch's weights were kept" in text
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    for shown in (text, format_table(res)):
        assert not re.search(r"\bnan\b|\binf\b", shown, re.IGNORECASE)
    assert "No validation split" not in write_report(tmp_path, res, _kd_histories()).read_text()
    loaded = json.loads(write_results(tmp_path, res).read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert loaded["models"]["student"]["accuracy"] is None and loaded["models"]["student"]["latency_ms_max"] is None


def test_speed_section_states_the_repeats(tmp_path):
    from distill.report import throughput_repeats

    assert throughput_repeats(30) == 10 and throughput_repeats(3) == 5
    res = _kd_run()
    res["config"]["report"] = {"latency_batch": 1, "throughput_batch": 64, "repeats": 9}
    text = write_report(tmp_path, res, {}).read_text()
    assert "over 9 repeats after 5 warm-up passes" in text and "batch size 64 over 5 repeats after 2 warm-up" in text
    student = [c.strip() for c in _row(text, "student").strip("|").split("|")]
    assert student[6:8] == ["0.500 (0.400–0.700)", "12,346 (10,000–13,000)"]
    assert "median (min–max)" in text
