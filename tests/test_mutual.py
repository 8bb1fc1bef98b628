"""Deep mutual learning: the loss against a hand computation, peers built and trained, config and recipe."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import train_student
from distill.errors import UserError
from distill.losses.mutual import mutual_loss
from distill.methods.mutual import Mutual, MutualConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import TrainConfig, validate_recipe
from distill.signals import LiveTeacher
from distill.students import MLPConfig, build_model
from distill.tasks.classification import evaluate
from distill.train import fit


def _np_softmax(z, T):
    e = np.exp(z / T - (z / T).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_kl(target, z, T):
    """mean over rows of T² · Σ_c p_target,c · (log p_target,c - log p_z,c), float64."""
    p, q = _np_softmax(target, T), _np_softmax(z, T)
    return T * T * np.mean([sum(p[i, c] * (np.log(p[i, c]) - np.log(q[i, c])) for c in range(p.shape[1])) for i in range(len(p))])


def _np_ce(z, y):
    rows = [i for i in range(len(y)) if y[i] != -1]
    p = _np_softmax(z, 1.0)
    return np.mean([-np.log(p[i, y[i]]) for i in rows])


def test_two_students_loss_and_gradients_match_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    z1, z2, t = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    y = torch.tensor([0, 4, -1, 2, 2, 1])  # one unlabelled row: CE skips it, the KL terms use it
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    T, kw, tw = 2.0, 0.7, 0.4
    loss, parts = mutual_loss([z1, z2], y, temperature=T, kl_weight=kw, teacher_logits=t, teacher_weight=tw)

    a, b, tt, yy = z1.detach().numpy(), z2.detach().numpy(), t.numpy(), y.numpy()
    l1 = _np_ce(a, yy) + kw * _np_kl(b, a, T) + tw * _np_kl(tt, a, T)
    l2 = _np_ce(b, yy) + kw * _np_kl(a, b, T) + tw * _np_kl(tt, b, T)
    assert loss.item() == pytest.approx(l1 + l2, rel=1e-10)
    assert parts["ce"].item() == pytest.approx((_np_ce(a, yy) + _np_ce(b, yy)) / 2, rel=1e-10)
    assert parts["kl"].item() == pytest.approx((_np_kl(b, a, T) + _np_kl(a, b, T)) / 2, rel=1e-10)
    assert parts["teacher"].item() == pytest.approx((_np_kl(tt, a, T) + _np_kl(tt, b, T)) / 2, rel=1e-10)

    # The peer is a fixed target for student 1: d loss / d z1 is the gradient of L_1 alone, i.e.
    # (softmax(z1) - onehot(y))/n_labelled on labelled rows + (kw·T·(p1 - p2) + tw·T·(p1 - pt)) / N.
    loss.backward()
    onehot = np.zeros_like(a)
    for i, c in enumerate(yy):
        if c != -1:
            onehot[i, c] = 1
    labelled = (yy != -1)[:, None]
    p1, p2, pt = _np_softmax(a, T), _np_softmax(b, T), _np_softmax(tt, T)
    expected = labelled * (_np_softmax(a, 1.0) - onehot) / labelled.sum() + (kw * T * (p1 - p2) + tw * T * (p1 - pt)) / len(a)
    np.testing.assert_allclose(z1.grad.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_three_students_average_their_peers_and_teacher_is_optional():
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 1])
    loss, parts = mutual_loss(zs, y, temperature=1.0, kl_weight=1.0)
    n = [z.numpy() for z in zs]
    expected = sum(_np_ce(n[k], y.numpy()) + sum(_np_kl(n[j], n[k], 1.0) for j in range(3) if j != k) / 2 for k in range(3))
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert set(parts) == {"ce", "kl"}


def test_peers_are_fresh_copies_trained_by_one_backward(digits, digits_teacher):
    torch.manual_seed(0)
    student = build_model(MLPConfig(hidden=[64]), (1, 8, 8), 10)
    x, y = digits.train.x[:32], digits.train.y[:32]
    method = Mutual(MutualConfig(peers=2), LiveTeacher(digits_teacher))
    with pytest.raises(UserError, match="setup"):
        method(student, x, y)
    torch.manual_seed(0)  # as the trainer's set_seed before setup: peers must still not replay the student's init
    method.setup(student, x)
    after_setup = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after_setup)  # the global RNG stream is left alone
    peers = list(method.modules["peers"])
    assert len(peers) == 2
    nets = [student] + peers
    for a in range(3):
        for b in range(a + 1, 3):
            sa, sb = nets[a].state_dict(), nets[b].state_dict()
            assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in sb.items()}
            assert all(not torch.equal(sa[k], sb[k]) for k in sa), (a, b)
    again = Mutual(MutualConfig(peers=2), LiveTeacher(digits_teacher))
    torch.manual_seed(0)
    again.setup(student, x)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), method.parameters()))  # reproducible

    loss, parts = method(student, x, y)
    with torch.no_grad():
        expected, _ = mutual_loss([n(x) for n in nets], y, teacher_logits=digits_teacher(x))
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"ce", "kl", "teacher"}
    loss.backward()
    for net in nets:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None for p in digits_teacher.parameters())


def test_without_teacher_the_trainer_trains_student_and_peer(digits):
    method = Mutual(MutualConfig(use_teacher=False))  # no teacher given at all
    torch.manual_seed(0)
    student = build_model(MLPConfig(hidden=[64]), digits.input_shape, 10)
    result = fit(student, method, digits.train, digits.val, TrainConfig(epochs=6, batch_size=64, lr=0.003), progress=False)
    assert set(result.history[0]) >= {"train_ce", "train_kl"} and "train_teacher" not in result.history[0]
    assert evaluate(student, digits.test)["accuracy"] > 0.85
    assert evaluate(method.modules["peers"][0], digits.test)["accuracy"] > 0.85  # the optimizer saw the peer


def test_mutual_student_beats_scratch_on_digits(digits, digits_teacher):
    """T = 4 as in the KD test: at the paper's T = 1 the near one-hot teacher adds little here (see the report)."""
    scratch = [train_student(Supervised(SupervisedConfig()), digits, s) for s in (0, 1)]
    mutual = [train_student(Mutual(MutualConfig(temperature=4), LiveTeacher(digits_teacher)), digits, s) for s in (0, 1)]
    assert sum(mutual) <= sum(scratch), (mutual, scratch)


@pytest.mark.parametrize("field,value", [("peers", 0), ("temperature", 0), ("kl_weight", -1), ("teacher_weight", -0.5), ("peers", 1.5)])
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        MutualConfig(**{field: value})


def test_bad_loss_arguments_are_refused():
    z = torch.zeros(2, 3)
    with pytest.raises(UserError, match="at least 2"):
        mutual_loss([z], None)
    with pytest.raises(UserError, match="temperature"):
        mutual_loss([z, z], None, temperature=0)
    with pytest.raises(UserError, match="kl_weight"):
        mutual_loss([z, z], None, kl_weight=-1)
    with pytest.raises(UserError, match="shape"):
        mutual_loss([z, torch.zeros(2, 4)], None)


def test_selectable_from_a_recipe():
    config = validate_recipe({"distill": {"method": "mutual", "peers": 2, "use_teacher": False}}).distill
    assert isinstance(config, MutualConfig) and config.peers == 2 and not config.use_teacher
    with pytest.raises(UserError, match="peer"):
        validate_recipe({"distill": {"method": "mutual", "peer": 2}})
    with pytest.raises(UserError, match="peers"):
        validate_recipe({"distill": {"method": "mutual", "peers": 0}})
