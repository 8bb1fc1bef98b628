"""The loop: repeatable, resumable to the bit, best-on-validation, early stopping, clear failure on divergence."""

import pytest
import torch

from conftest import KilledAt
from distill.errors import UserError
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import TrainConfig
from distill.students import MLPConfig, build_model
from distill.tasks.classification import evaluate, random_shift
from distill.train import fit


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(MLPConfig(hidden=[32], dropout=0.1), (1, 8, 8), 10)



def test_training_learns_and_is_repeatable(digits):
    a, b = _model(), _model()
    ra = fit(a, Supervised(SupervisedConfig()), digits.train, digits.val, TrainConfig(epochs=8, batch_size=64, lr=0.01), progress=False)
    rb = fit(b, Supervised(SupervisedConfig()), digits.train, digits.val, TrainConfig(epochs=8, batch_size=64, lr=0.01), progress=False)
    assert evaluate(a, digits.test)["accuracy"] > 0.85
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_killed_run_resumes_bit_identically(digits, tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.003, jitter=1)  # jitter + dropout: RNG state matters
    straight = _model()
    fit(straight, Supervised(SupervisedConfig()), digits.train, digits.val, cfg, seed=3, progress=False)

    killed = _model()
    steps_per_epoch = -(-len(digits.train) // 64)
    with pytest.raises(KeyboardInterrupt):
        fit(killed, KilledAt(2 * steps_per_epoch + 5), digits.train, digits.val, cfg, seed=3,
            state_dir=tmp_path / "state", progress=False)
    resumed = _model(seed=99)  # different init: everything must come from the checkpoint
    torch.manual_seed(12345)  # and a disturbed global RNG
    result = fit(resumed, Supervised(SupervisedConfig()), digits.train, digits.val, cfg, seed=3,
                 state_dir=tmp_path / "state", resume=True, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    for p_straight, p_resumed in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p_straight, p_resumed)


def test_best_epoch_weights_are_returned_and_patience_stops(digits):
    model = _model()
    cfg = TrainConfig(epochs=30, batch_size=64, lr=0.003, patience=2)
    result = fit(model, Supervised(SupervisedConfig()), digits.train, digits.val, cfg, progress=False)
    assert len(result.history) < 30  # stopped early
    best = max(h["val_accuracy"] for h in result.history)
    assert result.best_val_score == best
    assert evaluate(model, digits.val)["accuracy"] == pytest.approx(best)  # the best weights, not the last


class _NaN(Supervised):
    def __call__(self, student, x, y):
        return student(x).sum() * float("nan"), {}


def test_divergence_is_one_clear_error(digits):
    with pytest.raises(UserError, match="train.lr"):
        fit(_model(), _NaN(SupervisedConfig()), digits.train, digits.val, TrainConfig(epochs=1), progress=False)


def test_max_norm_constraint_holds_after_training(digits):
    torch.manual_seed(0)
    model = build_model(MLPConfig(hidden=[64], max_norm=0.5), (1, 8, 8), 10)
    fit(model, Supervised(SupervisedConfig()), digits.train, None, TrainConfig(epochs=1, lr=0.05), progress=False)
    for layer in model.net:
        if isinstance(layer, torch.nn.Linear):
            assert layer.weight.norm(dim=1).max() <= 0.5 + 1e-5


def test_resume_refuses_a_checkpoint_without_its_best_weights(digits, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.003)
    fit(_model(), KilledAt(10**9), digits.train, digits.val, cfg.model_copy(update={"epochs": 1}),
        state_dir=tmp_path / "state", progress=False)
    (tmp_path / "state.best.safetensors").unlink()
    with pytest.raises(UserError, match="lost its best-on-validation weights .*state.best.safetensors") as e:
        fit(_model(), Supervised(SupervisedConfig()), digits.train, digits.val, cfg, state_dir=tmp_path / "state",
            resume=True, progress=False)
    assert "\n" not in str(e.value)


def test_cap_row_norms_equals_torch_renorm():
    from distill.students.mlp import cap_row_norms

    torch.manual_seed(0)
    w = torch.randn(20, 7) * torch.linspace(0.1, 3, 20)[:, None]  # rows below and above the cap
    capped = cap_row_norms(w, 2.0)
    torch.testing.assert_close(capped, torch.renorm(w, p=2, dim=0, maxnorm=2.0), rtol=0, atol=1e-6)
    norms = w.norm(dim=1)
    assert torch.equal(capped[norms <= 2.0], w[norms <= 2.0]) and (norms > 2.0).sum() > 5


def test_random_shift_moves_images_within_bounds():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 4] = 1.0  # one lit pixel
    shifted = random_shift(x, 2)
    assert shifted.shape == x.shape and torch.equal(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))
    rows, cols = shifted[:, 0].nonzero()[:, 1], shifted[:, 0].nonzero()[:, 2]
    assert rows.min() >= 1 and rows.max() <= 5 and cols.min() >= 2 and cols.max() <= 6
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # really random per image
    assert torch.equal(random_shift(x, 0), x)


def test_empty_validation_split_keeps_the_last_epoch(digits):
    from distill.data import ArrayDataset

    empty = ArrayDataset(digits.val.x[:0], digits.val.y[:0])
    model = _model()
    result = fit(model, Supervised(SupervisedConfig()), digits.train, empty, TrainConfig(epochs=3, lr=0.003), progress=False)
    assert result.best_epoch == 3 and "val_accuracy" not in result.history[-1]


def test_any_dataset_of_pairs_trains_and_validates(digits):
    """A user's own Dataset (no .x/.y attributes, per-sample __getitem__) works for training and validation."""

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, split):
            self.split = split

        def __len__(self):
            return len(self.split.y)

        def __getitem__(self, i):
            return self.split.x[i], self.split.y[i]

    model = _model()
    result = fit(model, Supervised(SupervisedConfig()), Pairs(digits.train), Pairs(digits.val),
                 TrainConfig(epochs=4, batch_size=64, lr=0.01), progress=False)
    assert result.best_val_score > 0.8
    assert evaluate(model, Pairs(digits.test))["accuracy"] == evaluate(model, digits.test)["accuracy"]


def test_resume_after_an_early_stop_does_not_train_on(digits, tmp_path):
    cfg = TrainConfig(epochs=30, batch_size=64, lr=0.003, patience=1)
    first = fit(_model(), Supervised(SupervisedConfig()), digits.train, digits.val, cfg, state_dir=tmp_path / "s", progress=False)
    assert len(first.history) < 30
    again = fit(_model(), Supervised(SupervisedConfig()), digits.train, digits.val, cfg, state_dir=tmp_path / "s",
                resume=True, progress=False)
    assert len(again.history) == len(first.history)


def test_state_writes_are_spaced_when_epochs_are_short(digits, tmp_path, monkeypatch):
    """Epochs of milliseconds: the resumable state is written after the first and the last epoch and then only as
    often as keeps writing at ~10% of the time (it used to be every epoch, 10x the training time); resuming
    from it still gives the uninterrupted run's weights."""
    import distill.train as train_mod

    epochs_written = []
    real = train_mod._save_state
    monkeypatch.setattr(train_mod, "_save_state", lambda *a, **k: (epochs_written.append(a[4].epochs_done), real(*a, **k)))
    monkeypatch.setattr(train_mod._Cadence, "COST_RATIO", 1e9)  # no time-based write in between: deterministic
    small = torch.utils.data.Subset(digits.train, range(64))
    cfg = TrainConfig(epochs=30, batch_size=64, lr=0.003)
    straight = _model()
    fit(straight, Supervised(SupervisedConfig()), small, digits.val, cfg, seed=1, progress=False)
    killed = _model()
    with pytest.raises(KeyboardInterrupt):
        fit(killed, KilledAt(20), small, digits.val, cfg, seed=1, state_dir=tmp_path / "s", progress=False)
    assert epochs_written == [1]
    resumed = _model(seed=5)
    fit(resumed, Supervised(SupervisedConfig()), small, digits.val, cfg, seed=1, state_dir=tmp_path / "s", resume=True, progress=False)
    assert epochs_written == [1, 2, 30]  # the first epoch of the resumed fit, and the last
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
