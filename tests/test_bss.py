"""Boundary supporting samples: the search reaches the teacher's boundary, the loss, config and recipe."""

import copy
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from conftest import train_student
from distill.errors import UserError
from distill.losses.bss import boundary_samples
from distill.losses.kd import kd_loss
from distill.methods.bss import BSS, BSSConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import validate_recipe
from distill.signals import LiveTeacher
from distill.students import MLPConfig, build_model


def _margin(teacher, x, b, k):
    with torch.no_grad():
        z = teacher(x)
    return (z.gather(1, b[:, None]) - z.gather(1, k[:, None])).squeeze(1)


def _np_kl(target, z, T):
    """mean over rows of T² · Σ_c softmax(target/T)_c · log(softmax(target/T)_c / softmax(z/T)_c), float64."""
    def softmax(v):
        e = np.exp(v / T - (v / T).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q = softmax(target.astype(np.float64)), softmax(z.astype(np.float64))
    return T * T * np.mean([sum(p[i, c] * math.log(p[i, c] / q[i, c]) for c in range(p.shape[1])) for i in range(len(p))])


def test_one_step_on_a_linear_teacher_is_the_update_rule():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()  # parameters left trainable on purpose
    x = torch.rand(5, 1, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        z = teacher(x)
    base = z.argmax(1)
    base[4] = (base[4] + 1) % 3  # the teacher does not predict this base: the row must stay where it is
    target = (base + 1) % 3
    out = boundary_samples(teacher, x, base, target, steps=1, step_size=0.2)

    W = teacher[1].weight.detach().numpy()
    for i in range(5):
        xi = x[i].reshape(-1).numpy()
        b, k = int(base[i]), int(target[i])
        if i == 4:
            np.testing.assert_array_equal(out[i].reshape(-1).numpy(), xi)
            continue
        g = W[b] - W[k]  # ∇x (z_b - z_k) of a linear model
        margin = float(z[i, b] - z[i, k])
        expected = xi - 0.2 * (margin + 1e-4) * g / np.sqrt((g * g).sum())
        np.testing.assert_allclose(out[i].reshape(-1).numpy(), expected, rtol=1e-12)
    assert all(p.grad is None for p in teacher.parameters())
    assert not out.requires_grad


def test_boundary_samples_approach_the_trained_teachers_boundary(digits, digits_teacher):
    teacher = digits_teacher.eval()
    before = copy.deepcopy(teacher.state_dict())
    x = digits.train.x[:64]
    with torch.no_grad():
        top = teacher(x).topk(2, dim=1).indices
    base, target = top[:, 0], top[:, 1]
    start = _margin(teacher, x, base, target)
    medians = [start.median().item()]
    for steps in (1, 2, 4, 10):
        adv = boundary_samples(teacher, x, base, target, steps=steps, step_size=0.03, clamp=(0.0, 1.0))
        medians.append(_margin(teacher, adv, base, target).median().item())
    final = _margin(teacher, adv, base, target)
    assert all(a > b for a, b in zip(medians, medians[1:])), medians  # the median margin shrinks step by step
    assert final.abs().median() < 0.05 * start.median(), (final.abs().median(), start.median())
    assert (final < start).all()  # every sample moved towards its boundary
    assert (final > -0.5).all()  # and none ran far past it (samples stop once the prediction flips)
    assert 0.0 <= adv.min() and adv.max() <= 1.0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_method_loss_is_kd_plus_kl_on_boundary_samples(digits, digits_teacher):
    torch.manual_seed(0)
    student = build_model(MLPConfig(hidden=[64]), (1, 8, 8), 10)
    x, y = digits.train.x[:40].clone(), digits.train.y[:40].clone()
    y[:10] = (y[:10] + 1) % 10  # wrong labels: these rows are not pushed (the teacher disagrees with them)
    config = BSSConfig(temperature=2.5, hard_weight=0.3, soft_weight=0.7, bss_weight=0.6, ratio=1.0, steps=3, top_classes=3)
    method = BSS(config, LiveTeacher(digits_teacher))
    before = copy.deepcopy(digits_teacher.state_dict())

    torch.manual_seed(1)
    loss, parts = method(student, x, y)
    torch.manual_seed(1)  # the same random choices again, outside the method
    with torch.no_grad():
        t = digits_teacher(x)
    x_adv = method.boundary_batch(x, y, t)
    n_correct = int((t.argmax(1) == y).sum())
    assert x_adv.shape == (n_correct, 1, 8, 8) and 20 <= n_correct <= 30  # ratio 1: all correctly classified rows

    with torch.no_grad():
        kd, _ = kd_loss(student(x), t, y, temperature=2.5, hard_weight=0.3, soft_weight=0.7)
        bss = _np_kl(digits_teacher(x_adv).numpy(), student(x_adv).numpy(), 2.5)
    assert parts["bss"].item() == pytest.approx(bss, rel=1e-5)
    assert loss.item() == pytest.approx(kd.item() + 0.6 * bss, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in digits_teacher.parameters())
    assert all(torch.equal(v, digits_teacher.state_dict()[k]) for k, v in before.items())

    with pytest.raises(UserError, match="top_classes"):
        BSS(BSSConfig(top_classes=11), LiveTeacher(digits_teacher))(student, x, y)


def test_bss_student_beats_scratch_on_digits(digits, digits_teacher):
    """3 larger steps instead of 10 (same final margins on this teacher, a third of the cost) to fit the test budget.
    T = 1 and bss_weight 0.5: at the paper's T = 3 and weight 1 this MLP on 400 rows loses to scratch (95 vs 84 test
    errors over seeds 0-2); at T = 1, weight 0.5 it makes 59 (plain KD at T = 1: 69)."""
    scratch = [train_student(Supervised(SupervisedConfig()), digits, s) for s in (0, 1)]
    config = BSSConfig(steps=3, step_size=0.05, temperature=1.0, bss_weight=0.5)
    bss = [train_student(BSS(config, LiveTeacher(digits_teacher)), digits, s) for s in (0, 1)]
    assert sum(bss) <= sum(scratch), (bss, scratch)


@pytest.mark.parametrize("field,value", [
    ("ratio", 0), ("ratio", 1.5), ("steps", 0), ("step_size", 0), ("top_classes", 1),
    ("bss_weight", -1), ("temperature", 0), ("hard_weight", -0.1),
])
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        BSSConfig(**{field: value})


def test_bad_search_arguments_are_refused():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 4)
    b, k = torch.tensor([0, 1]), torch.tensor([1, 2])
    with pytest.raises(UserError, match="steps"):
        boundary_samples(teacher, x, b, k, steps=0, step_size=0.1)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(UserError, match="step_size"):
            boundary_samples(teacher, x, b, k, steps=1, step_size=bad)
    with pytest.raises(UserError, match="differ"):
        boundary_samples(teacher, x, b, b, steps=1, step_size=0.1)
    with pytest.raises(UserError, match="target"):
        boundary_samples(teacher, x, b, torch.tensor([1, 3]), steps=1, step_size=0.1)
    with pytest.raises(UserError, match="base"):
        boundary_samples(teacher, x, b.float(), k, steps=1, step_size=0.1)
    with pytest.raises(UserError, match="clamp"):
        boundary_samples(teacher, x, b, k, steps=1, step_size=0.1, clamp=(1.0, 0.0))


def test_selectable_from_a_recipe():
    config = validate_recipe({"distill": {"method": "bss", "ratio": 0.25, "steps": 5}}).distill
    assert isinstance(config, BSSConfig) and config.ratio == 0.25 and config.temperature == 3.0
    with pytest.raises(UserError, match="step_sise|step_size"):
        validate_recipe({"distill": {"method": "bss", "step_sise": 0.1}})
    with pytest.raises(UserError, match="ratio"):
        validate_recipe({"distill": {"method": "bss", "ratio": 2}})
