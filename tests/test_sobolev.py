"""Sobolev training (order 1): directional derivatives against full Jacobians and finite differences, the loss
against explicit sums, the method's loss against its formula, bad parameters, recipes, and digits vs scratch."""

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from conftest import train_student
from distill.errors import UserError
from distill.losses.kd import kd_loss
from distill.losses.sobolev import directional_derivatives, random_unit_directions, sobolev_loss, sobolev_target
from distill.methods import DISTILL_METHODS
from distill.methods.kd import KD, KDConfig
from distill.methods.sobolev import Sobolev, SobolevConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import validate_recipe
from distill.signals import LiveTeacher
from distill.students import CNNConfig, MLPConfig, build_model


def _mlp(seed, shape=(1, 3, 4), hidden=(7,), classes=5, activation="tanh"):
    torch.manual_seed(seed)
    return build_model(MLPConfig(hidden=list(hidden), activation=activation), shape, classes).double()


def _x(shape, batch=4, seed=0):
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("target", [None, "log_probs", "logits"])
def test_jvp_equals_full_jacobian_times_v(target):
    model = _mlp(0).eval()
    x = _x((1, 3, 4))
    v = random_unit_directions(x, 3, generator=torch.Generator().manual_seed(1))
    fn = None if target is None else (lambda z: sobolev_target(z, target, 2.5))
    out, jvp = directional_derivatives(model, x, v, fn=fn)
    full = torch.autograd.functional.jacobian(lambda xx: model(xx) if fn is None else fn(model(xx)), x)  # [B, C, B, 1, 3, 4]
    B, C = out.shape
    expected = torch.stack([full.reshape(B, C, -1) @ v[k].reshape(-1) for k in range(3)])
    assert jvp.shape == (3, B, C)
    torch.testing.assert_close(jvp, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, model(x))
    _, single = directional_derivatives(model, x, v[1], fn=fn)  # one direction: v shaped like x
    torch.testing.assert_close(single, expected[1], rtol=1e-10, atol=1e-12)


def test_train_mode_dropout_and_batchnorm_match_finite_differences_and_train_the_parameters():
    """Outputs and derivatives come from one forward (same dropout mask, batch-stat BatchNorm)."""
    torch.manual_seed(0)
    model = build_model(CNNConfig(channels=[4], hidden=[8], dropout=0.5), (1, 4, 4), 3).double().train()
    x, v = _x((1, 4, 4), batch=6), _x((1, 4, 4), batch=6, seed=1)
    torch.manual_seed(7)
    out, jvp = directional_derivatives(model, x, v)
    eps = 1e-6
    f = []
    for sign in (1, -1):
        torch.manual_seed(7)  # the same dropout mask as above
        f.append(model(x + sign * eps * v))
    torch.testing.assert_close(jvp, (f[0] - f[1]) / (2 * eps), rtol=1e-5, atol=1e-7)
    torch.manual_seed(7)
    torch.testing.assert_close(out, model(x))
    (out.sum() + jvp.pow(2).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    frozen_out, frozen_jvp = directional_derivatives(model, x, v, create_graph=False)
    assert not frozen_out.requires_grad and not frozen_jvp.requires_grad


def test_sobolev_loss_against_explicit_sums():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
    per = np.zeros(5)
    for b in range(5):
        for k in range(3):
            for c in range(4):
                per[b] += (s[k, b, c] - t[k, b, c]) ** 2
    S, Tt = torch.from_numpy(s), torch.from_numpy(t)
    np.testing.assert_allclose(sobolev_loss(S, Tt, reduction="none").numpy(), per, rtol=1e-12)
    np.testing.assert_allclose(sobolev_loss(S, Tt).item(), per.sum() / 5, rtol=1e-12)
    np.testing.assert_allclose(sobolev_loss(S, Tt, reduction="sum").item(), per.sum(), rtol=1e-12)
    one = ((s[0] - t[0]) ** 2).sum(-1)  # [B, C]: a single direction per sample
    np.testing.assert_allclose(sobolev_loss(S[0], Tt[0]).item(), one.mean(), rtol=1e-12)
    assert sobolev_loss(S, S).item() == 0.0


def test_targets_and_their_shift_invariance():
    z = _x((5,), batch=3)
    zn = z.numpy() / 2.0
    expected = zn - np.log(np.exp(zn).sum(-1, keepdims=True))
    np.testing.assert_allclose(sobolev_target(z, "log_probs", 2.0).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(sobolev_target(z, "logits", 2.0).numpy(), zn, rtol=1e-12)
    # adding c(x) to every logit changes no prediction: log_probs derivatives ignore it, logit derivatives do not
    model = _mlp(1, shape=(6,)).eval()
    shifted = lambda x: model(x) + x.pow(2).sum(1, keepdim=True)  # noqa: E731
    x = _x((6,))
    v = random_unit_directions(x, 2, generator=torch.Generator().manual_seed(0))
    for target, same in (("log_probs", True), ("logits", False)):
        fn = lambda o: sobolev_target(o, target, 3.0)  # noqa: E731
        a, b = directional_derivatives(model, x, v, fn=fn)[1], directional_derivatives(shifted, x, v, fn=fn)[1]
        assert torch.allclose(a, b, atol=1e-12) == same


def test_random_unit_directions():
    x = torch.zeros(4, 1, 3, 5)
    v = random_unit_directions(x, 3, generator=torch.Generator().manual_seed(0))
    assert v.shape == (3, 4, 1, 3, 5) and v.dtype == x.dtype
    torch.testing.assert_close(v.double().flatten(2).norm(dim=-1), torch.ones(3, 4, dtype=torch.float64))
    assert not torch.allclose(v[0], v[1])
    torch.testing.assert_close(v, random_unit_directions(x, 3, generator=torch.Generator().manual_seed(0)))


def test_bad_arguments_raise():
    x = torch.zeros(4, 6)
    for n in (0, True, 1.5):
        with pytest.raises(UserError, match=r"\bn\b"):
            random_unit_directions(x, n)
    with pytest.raises(UserError, match="x must"):
        random_unit_directions(torch.zeros(4, 6, dtype=torch.long), 1)
    with pytest.raises(UserError, match="v must"):
        directional_derivatives(nn.Linear(6, 2), x, torch.zeros(4, 5))
    with pytest.raises(UserError, match="student_jvp shape"):
        sobolev_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(UserError, match="teacher_jvp"):
        sobolev_loss(torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(UserError, match="reduction"):
        sobolev_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="mean")
    with pytest.raises(UserError, match="target"):
        sobolev_target(torch.zeros(2, 3), "probs")
    with pytest.raises(UserError, match="temperature"):
        sobolev_target(torch.zeros(2, 3), "logits", 0)
    for field, value in (("derivative_weight", -1.0), ("directions", 0), ("target", "probs"), ("temperature", 0)):
        with pytest.raises(ValidationError, match=field):
            SobolevConfig(**{field: value})

    class CachedLogits:  # a teacher signal without the network behind it
        def __call__(self, x):
            return torch.zeros(len(x), 2)

    with pytest.raises(UserError, match="live teacher"):
        Sobolev(SobolevConfig(), CachedLogits())(nn.Linear(6, 2), x, torch.zeros(4, dtype=torch.long))


def test_method_loss_is_the_formula_zero_for_a_copy_and_trains_only_the_student():
    teacher = _mlp(0, shape=(1, 3, 4), hidden=(9,), activation="relu").float()
    x, y = _x((1, 3, 4), batch=8).float(), torch.arange(8) % 5
    config = SobolevConfig(temperature=2.0, hard_weight=0.3, soft_weight=0.7, derivative_weight=0.5, directions=2)
    twin = Sobolev(config, LiveTeacher(copy.deepcopy(teacher)))(copy.deepcopy(teacher), x, y)[1]
    assert twin["derivative"].item() == 0.0 and abs(twin["soft"].item()) < 1e-6
    student = _mlp(1, shape=(1, 3, 4), hidden=(9,), activation="relu").float().train()
    torch.manual_seed(3)
    loss, parts = Sobolev(config, LiveTeacher(teacher))(student, x, y)
    assert set(parts) == {"hard", "soft", "derivative"} and parts["derivative"] > 0
    torch.manual_seed(3)  # the same random directions, recomputed independently
    v = random_unit_directions(x, 2)
    fn = lambda z: sobolev_target(z, "log_probs", 2.0)  # noqa: E731
    _, tj = directional_derivatives(teacher, x, v, fn=fn, create_graph=False)
    s, sj = directional_derivatives(student, x, v, fn=fn)
    expected = kd_loss(s, teacher(x), y, temperature=2.0, hard_weight=0.3, soft_weight=0.7)[0] + 0.5 * sobolev_loss(sj, tj)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # derivative_weight 0 is plain KD
    plain = Sobolev(config.model_copy(update={"derivative_weight": 0.0}), LiveTeacher(teacher))(student, x, y)[0]
    kd = KD(KDConfig(temperature=2.0, hard_weight=0.3, soft_weight=0.7), LiveTeacher(teacher))(student, x, y)[0]
    torch.testing.assert_close(plain, kd)


def test_selectable_from_a_recipe():
    assert "sobolev" in DISTILL_METHODS
    recipe = validate_recipe({"distill": {"method": "sobolev", "directions": 2, "target": "logits", "derivative_weight": 0.5}})
    assert isinstance(recipe.distill, SobolevConfig)
    assert (recipe.distill.directions, recipe.distill.target, recipe.distill.derivative_weight) == (2, "logits", 0.5)
    with pytest.raises(UserError, match="directions"):
        validate_recipe({"distill": {"method": "sobolev", "direction": 2}})
    with pytest.raises(UserError, match="directions"):
        validate_recipe({"distill": {"method": "sobolev", "directions": 0}})


def test_sobolev_student_matches_or_beats_scratch_on_digits(digits, digits_teacher):
    """Same architecture, initial weights and data order; default config (T=4, derivative_weight 1, log_probs)."""
    scratch = [train_student(Supervised(SupervisedConfig()), digits, s) for s in (0, 1)]
    sobolev = [train_student(Sobolev(SobolevConfig(), LiveTeacher(digits_teacher)), digits, s) for s in (0, 1)]
    assert sum(sobolev) <= sum(scratch), (sobolev, scratch)
