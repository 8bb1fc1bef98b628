"""Many teachers as one: the averaging maths, and an ensemble teacher that distils a digits student."""

import numpy as np
import pytest
import torch

from conftest import train_student
from distill import Distiller
from distill.errors import UserError
from distill.methods.kd import KD, KDConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.signals import LiveTeacher, TeacherEnsemble
from distill.students import MLPConfig, build_model


class _Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[: len(x)]


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_probability_and_logit_averages_against_numpy():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7, dtype=torch.float64) * 4, torch.randn(5, 7, dtype=torch.float64) * 4
    x = torch.zeros(5, 1)
    probs = TeacherEnsemble([_Fixed(a), _Fixed(b)], weights=[1, 3], combine="probs")(x)
    expected = 0.25 * _softmax(a.numpy()) + 0.75 * _softmax(b.numpy())
    np.testing.assert_allclose(torch.softmax(probs, -1).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(probs.exp().sum(-1).numpy(), 1.0, rtol=1e-12)  # log-probabilities
    logits = TeacherEnsemble([_Fixed(a), _Fixed(b)], weights=[1, 3], combine="logits")(x)
    np.testing.assert_allclose(logits.numpy(), 0.25 * a.numpy() + 0.75 * b.numpy(), rtol=1e-12)
    single = TeacherEnsemble([_Fixed(a)], combine="logits")(x)
    assert torch.equal(single, a)


def test_bad_ensembles_are_refused():
    t = _Fixed(torch.zeros(2, 3))
    with pytest.raises(UserError, match="one per teacher"):
        TeacherEnsemble([t, t], weights=[1.0])
    with pytest.raises(UserError, match=">= 0"):
        TeacherEnsemble([t, t], weights=[1.0, -1.0])
    with pytest.raises(UserError, match="at least one"):
        TeacherEnsemble([])
    with pytest.raises(UserError, match="combine"):
        TeacherEnsemble([t], combine="median")
    with pytest.raises(UserError, match="output shapes"):
        TeacherEnsemble([t, _Fixed(torch.zeros(2, 4))])(torch.zeros(2, 1))


def test_ensemble_of_teachers_distils_a_better_student(digits, digits_teacher):
    """The CNN teacher plus a wide MLP teacher, averaged: the student beats scratch."""
    from distill.recipe import TrainConfig
    from distill.train import fit

    torch.manual_seed(1)
    mlp = build_model(MLPConfig(hidden=[256], dropout=0.2), digits.input_shape, 10)
    fit(mlp, Supervised(SupervisedConfig()), digits.train, digits.val, TrainConfig(epochs=30, batch_size=64, lr=0.003), progress=False)
    ensemble = TeacherEnsemble([digits_teacher, mlp.eval()], weights=[2, 1])
    scratch = [train_student(Supervised(SupervisedConfig()), digits, s) for s in (0, 1)]
    distilled = [train_student(KD(KDConfig(temperature=4), LiveTeacher(ensemble)), digits, s) for s in (0, 1)]
    assert sum(distilled) <= sum(scratch), (distilled, scratch)
    assert Distiller(ensemble, build_model(MLPConfig(hidden=[8]), (1, 8, 8), 10)).loss(digits.train.x[:8], digits.train.y[:8])[0] > 0
