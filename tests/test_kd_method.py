"""KD as a method: its loss is kd_loss on (student, teacher) logits, and it trains a better student than scratch."""

import pytest
import torch

from distill import Distiller, kd_loss
from distill.data import ArrayDataset, load_dataset
from distill.errors import UserError
from distill.methods.kd import KD, KDConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import TrainConfig
from distill.signals import LiveTeacher
from distill.students import CNNConfig, MLPConfig, build_model
from distill.tasks.classification import evaluate
from distill.train import fit

STUDENT = MLPConfig(hidden=[64])
STUDENT_TRAIN = TrainConfig(epochs=60, batch_size=64, lr=0.003)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher(digits):
    """A small CNN, as in the default recipe: ~99% on digits' test split."""
    torch.manual_seed(0)
    model = build_model(CNNConfig(channels=[32, 64], hidden=[256], dropout=0.3), digits.input_shape, 10)
    fit(model, Supervised(SupervisedConfig()), digits.train, digits.val,
        TrainConfig(epochs=40, batch_size=64, lr=0.001, jitter=1), progress=False)
    assert evaluate(model, digits.test)["accuracy"] > 0.97
    return model.eval()


def _student(seed):
    torch.manual_seed(seed)
    return build_model(STUDENT, (1, 8, 8), 10)


def _train(method, data, digits, seed, cfg=STUDENT_TRAIN):
    model = _student(seed)  # scratch and distilled students start from the same weights
    fit(model, method, data, digits.val, cfg, seed=seed, progress=False)
    return evaluate(model, digits.test)["errors"]


def test_kd_student_beats_scratch_on_digits(digits, teacher):
    """Same architecture, same initial weights, same data order: only the teacher differs."""
    scratch = [_train(Supervised(SupervisedConfig()), digits.train, digits, s) for s in (0, 1)]
    distilled = [_train(KD(KDConfig(temperature=4), LiveTeacher(teacher)), digits.train, digits, s) for s in (0, 1)]
    assert sum(distilled) < sum(scratch), (distilled, scratch)


def test_pseudo_labels_use_unlabelled_rows(digits, teacher):
    """80% of the training labels hidden: the teacher's argmax on those rows must help (seed 001)."""
    y = digits.train.y.clone()
    y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: int(0.8 * len(y))]] = -1
    data = ArrayDataset(digits.train.x, y)
    hard_only = dict(hard_weight=1.0, soft_weight=0.0)
    with_pseudo = _train(KD(KDConfig(**hard_only, pseudo_labels=True), LiveTeacher(teacher)), data, digits, 0)
    without = _train(KD(KDConfig(**hard_only, pseudo_labels=False), LiveTeacher(teacher)), data, digits, 0)
    scratch = _train(Supervised(SupervisedConfig()), data, digits, 0)
    assert without == scratch  # no soft term, no pseudo-labels: exactly the scratch objective
    assert with_pseudo < scratch - 5, (with_pseudo, scratch)


def test_method_loss_is_kd_loss_of_the_two_networks(digits, teacher):
    student = _student(0)
    x, y = digits.train.x[:32], digits.train.y[:32]
    config = KDConfig(temperature=3.0, hard_weight=0.3, soft_weight=0.7, soft_loss="soft_ce")
    loss, parts = KD(config, LiveTeacher(teacher))(student, x, y)
    with torch.no_grad():
        t = teacher(x)
    expected, _ = kd_loss(student(x), t, y, temperature=3.0, hard_weight=0.3, soft_weight=0.7, soft="soft_ce")
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"hard", "soft"}
    loss.backward()  # the teacher's output was produced without autograd yet can be used in the loss
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_distiller_api_in_a_users_own_loop(digits, teacher):
    student = _student(0)
    d = Distiller(teacher, student, method="kd", temperature=4.0)
    opt = torch.optim.Adam(d.parameters(), lr=0.003)
    before = evaluate(student, digits.test)["accuracy"]
    for epoch in range(5):
        for i in range(0, len(digits.train), 64):
            loss, _ = d.loss(digits.train.x[i : i + 64], digits.train.y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert evaluate(student, digits.test)["accuracy"] > max(before, 0.85)
    assert not teacher.training  # the teacher stays in eval mode


def test_distiller_fit_and_bad_arguments(digits, teacher):
    student = _student(1)
    result = Distiller(teacher, student, temperature=4.0).fit(digits.train, digits.val, epochs=3, batch_size=64, lr=0.003, progress=False)
    assert len(result.history) == 3 and result.best_val_accuracy > 0.5
    with pytest.raises(UserError, match="temperature"):
        Distiller(teacher, student, temperature=0)
    with pytest.raises(UserError, match="unknown method"):
        Distiller(teacher, student, method="nope")
    with pytest.raises(UserError, match="epochs"):
        Distiller(teacher, student).fit(digits.train, epochs=0)
    wrong = build_model(MLPConfig(hidden=[8]), (1, 8, 8), 5)  # 5 classes vs the teacher's 10
    with pytest.raises(UserError, match=r"\(4, 5\).*\(4, 10\)|\(4, 10\).*\(4, 5\)"):
        Distiller(teacher, wrong).loss(digits.train.x[:4], digits.train.y[:4] % 5)
