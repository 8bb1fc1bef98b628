"""KD as a method: its loss is kd_loss on (student, teacher) logits, and it trains a better student than scratch."""

import pytest
import torch

from conftest import train_student
from distill import Distiller, kd_loss
from distill.data import ArrayDataset
from distill.errors import UserError
from distill.methods.kd import KD, KDConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.signals import LiveTeacher
from distill.students import MLPConfig, build_model
from distill.tasks.classification import evaluate


def _student(seed):
    torch.manual_seed(seed)
    return build_model(MLPConfig(hidden=[64]), (1, 8, 8), 10)


def test_kd_student_beats_scratch_on_digits(digits, digits_teacher):
    """Same architecture, same initial weights, same data order: only the teacher differs."""
    scratch = [train_student(Supervised(SupervisedConfig()), digits, s) for s in (0, 1)]
    distilled = [train_student(KD(KDConfig(temperature=4), LiveTeacher(digits_teacher)), digits, s) for s in (0, 1)]
    assert sum(distilled) < sum(scratch), (distilled, scratch)


def test_pseudo_labels_use_unlabelled_rows(digits, digits_teacher):
    """80% of the training labels hidden: the teacher's argmax on those rows must help (seed 001)."""
    y = digits.train.y.clone()
    y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: int(0.8 * len(y))]] = -1
    data = ArrayDataset(digits.train.x, y)
    hard_only = dict(hard_weight=1.0, soft_weight=0.0)
    with_pseudo = train_student(KD(KDConfig(**hard_only, pseudo_labels=True), LiveTeacher(digits_teacher)), digits, 0, data)
    without = train_student(KD(KDConfig(**hard_only, pseudo_labels=False), LiveTeacher(digits_teacher)), digits, 0, data)
    scratch = train_student(Supervised(SupervisedConfig()), digits, 0, data)
    assert without == scratch  # no soft term, no pseudo-labels: exactly the scratch objective
    assert with_pseudo < scratch - 5, (with_pseudo, scratch)


def test_method_loss_is_kd_loss_of_the_two_networks(digits, digits_teacher):
    student = _student(0)
    x, y = digits.train.x[:32], digits.train.y[:32]
    config = KDConfig(temperature=3.0, hard_weight=0.3, soft_weight=0.7, soft_loss="soft_ce")
    loss, parts = KD(config, LiveTeacher(digits_teacher))(student, x, y)
    with torch.no_grad():
        t = digits_teacher(x)
    expected, _ = kd_loss(student(x), t, y, temperature=3.0, hard_weight=0.3, soft_weight=0.7, soft="soft_ce")
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"hard", "soft"}
    loss.backward()  # the teacher's output was produced without autograd yet can be used in the loss
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in digits_teacher.parameters())


def test_distiller_api_in_a_users_own_loop(digits, digits_teacher):
    student = _student(0)
    d = Distiller(digits_teacher, student, method="kd", temperature=4.0)
    opt = torch.optim.Adam(d.parameters(), lr=0.003)
    before = evaluate(student, digits.test)["accuracy"]
    for epoch in range(5):
        for i in range(0, len(digits.train), 64):
            loss, _ = d.loss(digits.train.x[i : i + 64], digits.train.y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert evaluate(student, digits.test)["accuracy"] > max(before, 0.85)
    assert not digits_teacher.training  # the teacher stays in eval mode


def test_distiller_fit_and_bad_arguments(digits, digits_teacher):
    student = _student(1)
    result = Distiller(digits_teacher, student, temperature=4.0).fit(digits.train, digits.val, epochs=3, batch_size=64, lr=0.003, progress=False)
    assert len(result.history) == 3 and result.best_val_score > 0.5
    with pytest.raises(UserError, match="temperature"):
        Distiller(digits_teacher, student, temperature=0)
    with pytest.raises(UserError, match="unknown method"):
        Distiller(digits_teacher, student, method="nope")
    with pytest.raises(UserError, match="epochs"):
        Distiller(digits_teacher, student).fit(digits.train, epochs=0)
    wrong = build_model(MLPConfig(hidden=[8]), (1, 8, 8), 5)  # 5 classes vs the teacher's 10
    with pytest.raises(UserError, match=r"\(4, 5\).*\(4, 10\)|\(4, 10\).*\(4, 5\)"):
        Distiller(digits_teacher, wrong).loss(digits.train.x[:4], digits.train.y[:4] % 5)


def test_a_half_precision_teacher_gives_float32_logits_close_to_fp32(digits, digits_teacher):
    from distill.signals import LiveTeacher

    x = digits.test.x[:64]
    full = LiveTeacher(digits_teacher)(x)
    for precision, tol in (("bf16", 0.1), ("fp16", 0.01)):
        half = LiveTeacher(digits_teacher, precision)
        logits = half(x)
        assert logits.dtype == torch.float32 and logits.requires_grad is False
        assert next(half.model.parameters()).dtype != torch.float32
        assert next(digits_teacher.parameters()).dtype == torch.float32  # the caller's model is untouched
        assert (logits - full).abs().max() < tol * full.abs().max()
        assert (logits.argmax(-1) == full.argmax(-1)).float().mean() > 0.95


def test_methods_that_read_teacher_layers_refuse_a_half_teacher(digits, digits_teacher):
    from distill.errors import UserError
    from distill.methods import DISTILL_METHODS, build_method
    from distill.signals import LiveTeacher
    from distill.students import MLPConfig, build_model

    student = build_model(MLPConfig(hidden=[16]), digits.input_shape, 10)
    x, y = digits.train.x[:8], digits.train.y[:8]
    for name in ("sobolev", "bss"):
        method = build_method(DISTILL_METHODS[name].Config(method=name), LiveTeacher(digits_teacher, "bf16"))
        with pytest.raises(UserError, match="set teacher.precision: fp32"):
            method(student, x, y)


def test_the_live_teacher_answers_in_eval_mode_even_after_a_train_call():
    from torch import nn

    from distill.signals import LiveTeacher

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 3))
    x = torch.randn(16, 6)
    with torch.no_grad():
        want = model.eval()(x)
    teacher = LiveTeacher(model)
    for switched in (model, model[1]):  # a user's loop calling .train() on everything, or on one layer
        switched.train()
        assert torch.equal(teacher(x), want) and not any(m.training for m in model.modules())


def test_kd_without_a_soft_term_is_weighted_cross_entropy_and_does_not_run_the_teacher(digits):
    """soft_weight 0 (sequence-level KD trains on the teacher's translations as labels): w_s · CE, no teacher call."""
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            calls.append(1)
            return torch.zeros(len(x), 10)

    torch.manual_seed(0)
    student = build_model(MLPConfig(hidden=[8]), digits.input_shape, 10)
    x, y = digits.train.x[:16], digits.train.y[:16]
    loss, parts = KD(KDConfig(hard_weight=0.7, soft_weight=0.0), LiveTeacher(Counting()))(student, x, y)
    expected = 0.7 * torch.nn.functional.cross_entropy(student(x).double(), y)
    assert torch.allclose(loss.double(), expected, rtol=1e-6) and calls == [] and set(parts) == {"hard"}
    y[0] = -1  # an unlabelled row needs the teacher's argmax: then it runs
    KD(KDConfig(hard_weight=0.7, soft_weight=0.0), LiveTeacher(Counting()))(student, x, y)
    assert calls
