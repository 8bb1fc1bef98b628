"""Noisy teacher: the perturbation's statistics per mode, exactly KD when there is no noise, the fraction of
perturbed batches, bad parameters, recipe selection, and the method against scratch on digits."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from conftest import train_student
from distill.errors import UserError
from distill.losses.kd import kd_loss
from distill.losses.noise import perturb_logits
from distill.methods.kd import KD, KDConfig
from distill.methods.noisy import Noisy, NoisyConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import validate_recipe
from distill.signals import LiveTeacher

Z = torch.tensor([-6.0, -2.0, -0.5, 0.0, 0.5, 3.0, 8.0])


def _draws(mode, sigma, n=40_000):
    z = Z.double().expand(n, -1).contiguous()
    out = perturb_logits(z, sigma, mode, generator=torch.Generator().manual_seed(0))
    assert out.shape == z.shape and out.dtype == z.dtype
    return z, out - z


def test_additive_noise_is_n0_sigma2_whatever_the_logit():
    sigma, n = 0.3, 40_000
    _, delta = _draws("additive", sigma, n)
    # per logit value: mean 0 within 5 standard errors, std sigma within 3%
    assert (delta.mean(0).abs() < 5 * sigma / n**0.5).all(), delta.mean(0)
    torch.testing.assert_close(delta.std(0), torch.full((len(Z),), sigma, dtype=torch.float64), rtol=0.03, atol=0)
    corr = torch.corrcoef(delta[:, :2].T)[0, 1]  # independent per element
    assert abs(float(corr)) < 0.03


def test_multiplicative_noise_scales_with_the_logit():
    sigma, n = 0.2, 40_000
    z, delta = _draws("multiplicative", sigma, n)
    assert (delta[:, Z == 0] == 0).all()  # z·(1+ξ) leaves a zero logit at zero
    nz = Z != 0
    xi = delta[:, nz] / z[:, nz]  # the relative perturbation is ξ ~ N(0, σ²)
    assert (xi.mean(0).abs() < 5 * sigma / n**0.5).all(), xi.mean(0)
    torch.testing.assert_close(xi.std(0), torch.full((int(nz.sum()),), sigma, dtype=torch.float64), rtol=0.03, atol=0)
    torch.testing.assert_close(delta.std(0), sigma * Z.abs().double(), rtol=0.03, atol=1e-12)


def test_perturbation_uses_the_global_rng_and_is_pure():
    z = torch.randn(4, 10)
    before = z.clone()
    torch.manual_seed(7)
    a = perturb_logits(z, 0.5, "additive")
    torch.manual_seed(7)
    b = perturb_logits(z, 0.5, "additive")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, z) and torch.equal(z, before)  # noise was added, the input was not modified
    state = torch.get_rng_state()
    assert perturb_logits(z, 0.0, "multiplicative") is z  # sigma 0: the logits themselves, no RNG drawn
    assert torch.equal(torch.get_rng_state(), state)


def test_perturb_refuses_bad_sigma_and_mode():
    z = torch.randn(2, 3)
    for sigma in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(UserError, match="sigma"):
            perturb_logits(z, sigma, "additive")
    with pytest.raises(UserError, match="mode"):
        perturb_logits(z, 0.1, "gaussian")
    with pytest.raises(UserError, match="logits"):
        perturb_logits(torch.ones(2, 3, dtype=torch.long), 0.1)


def test_config_bounds_and_recipe():
    for bad, field in [({"sigma": -0.01}, "sigma"), ({"p": -0.1}, "p"), ({"p": 1.5}, "p"),
                       ({"mode": "gaussian"}, "mode"), ({"temperature": 0}, "temperature"),
                       ({"hard_weight": 0, "soft_weight": 0}, "soft_weight")]:
        with pytest.raises(ValidationError, match=field):
            NoisyConfig(**bad)
    c = validate_recipe({"distill": {"method": "noisy", "sigma": 0.3, "mode": "additive", "soft_loss": "mse"}}).distill
    assert isinstance(c, NoisyConfig) and (c.sigma, c.p, c.mode, c.soft_loss, c.temperature) == (0.3, 0.5, "additive", "mse", 4.0)
    assert isinstance(c, KDConfig) and NoisyConfig().mode == "multiplicative"
    with pytest.raises(UserError, match="distill.p"):
        validate_recipe({"distill": {"method": "noisy", "p": 2}})
    with pytest.raises(UserError, match="unknown key 'distill.sgima'"):
        validate_recipe({"distill": {"method": "noisy", "sgima": 0.1}})


class _FixedTeacher:
    def __init__(self, logits):
        self.logits = logits

    def __call__(self, x):
        return self.logits.clone()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(16, 5, generator=g), torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    y[:4] = -1
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 10), x, t, y


def test_no_noise_is_exactly_kd():
    student, x, t, y = _batch()
    kd = dict(temperature=3.0, hard_weight=0.2, soft_weight=0.8, soft_loss="soft_ce")
    want, _ = KD(KDConfig(**kd), _FixedTeacher(t))(student, x, y)
    for mode in ("multiplicative", "additive"):
        for sigma, p in [(0.0, 1.0), (0.0, 0.5), (0.5, 0.0)]:
            loss, parts = Noisy(NoisyConfig(sigma=sigma, p=p, mode=mode, **kd), _FixedTeacher(t))(student, x, y)
            torch.testing.assert_close(loss, want, rtol=0, atol=0)
            assert float(parts["perturbed"]) == 0.0


@pytest.mark.parametrize("mode", ["multiplicative", "additive"])
def test_noise_reaches_the_kd_loss(mode):
    student, x, t, y = _batch(1)
    torch.manual_seed(3)
    loss, parts = Noisy(NoisyConfig(sigma=0.5, p=1.0, mode=mode), _FixedTeacher(t))(student, x, y)
    torch.manual_seed(3)  # p = 1 draws no coin: the same draw as perturb_logits alone
    noisy_t = perturb_logits(t, 0.5, mode)
    with torch.no_grad():
        s = student(x)
    want, _ = kd_loss(s, noisy_t, y, temperature=4.0, hard_weight=0.1, soft_weight=0.9)
    torch.testing.assert_close(loss, want)
    assert float(parts["perturbed"]) == 1.0
    assert abs(float(loss.detach()) - float(kd_loss(s, t, y, temperature=4.0, hard_weight=0.1, soft_weight=0.9)[0])) > 1e-4


def test_fraction_of_perturbed_batches_is_p():
    student, x, t, y = _batch(2)
    with torch.no_grad():
        clean, _ = kd_loss(student(x), t, y, temperature=4.0, hard_weight=0.1, soft_weight=0.9)
    torch.manual_seed(0)
    for p in (0.3, 0.8):
        method = Noisy(NoisyConfig(sigma=0.2, p=p), _FixedTeacher(t))
        flags = []
        with torch.no_grad():
            for _ in range(1500):
                loss, parts = method(student, x, y)
                flags.append(bool(parts["perturbed"]))
                assert flags[-1] == (float(loss) != float(clean))  # the flag tells the truth
        frac = sum(flags) / len(flags)
        assert abs(frac - p) < 4 * (p * (1 - p) / len(flags)) ** 0.5, (frac, p)


def test_noisy_student_matches_or_beats_scratch_on_digits(digits, digits_teacher):
    scratch = [train_student(Supervised(SupervisedConfig()), digits, s) for s in (0, 1)]
    noisy = [train_student(Noisy(NoisyConfig(), LiveTeacher(digits_teacher)), digits, s) for s in (0, 1)]
    print(f"noisy(sigma=0.1, p=0.5, multiplicative) errors {noisy} vs scratch {scratch}")
    assert sum(noisy) <= sum(scratch), (noisy, scratch)
