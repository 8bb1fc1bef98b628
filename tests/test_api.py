"""The Python API as an everyday user meets it: datasets of every kind, saving and loading, evaluating what the API
saved, a user's own model classes."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, random_split

import distill
from custom_models import TinyNet
from distill import Distiller
from distill.cli import main
from distill.errors import UserError
from distill.students import MLPConfig, build_model
from distill.tasks.classification import evaluate


def _student(digits, seed=0, hidden=(32,)):
    torch.manual_seed(seed)
    return build_model(MLPConfig(hidden=list(hidden)), digits.input_shape, digits.num_classes)


class _Counting(torch.nn.Module):
    """Wraps a model and records the batch sizes it is trained on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        if self.training:
            self.sizes.append(len(x))
        return self.model(x)


def test_fit_takes_a_subset_from_random_split(digits, digits_teacher):
    """random_split returns Subsets of a TensorDataset: rows come one by one and are collated by PyTorch."""
    full = TensorDataset(digits.train.x, digits.train.y)
    train, val = random_split(full, [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    student = _Counting(_student(digits))
    result = Distiller(digits_teacher, student, temperature=1.0).fit(train, val, epochs=2, batch_size=50, lr=0.003, progress=False)
    assert result.student is student and len(result.history) == 2
    assert set(student.sizes) == {50, len(train) % 50} and sum(student.sizes) == 2 * len(train)
    assert evaluate(student, digits.test)["accuracy"] > 0.5


class _Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y)


def test_fit_takes_an_iterable_dataset(digits, digits_teacher):
    student = _Counting(_student(digits))
    d = Distiller(digits_teacher, student, temperature=1.0)
    result = d.fit(_Stream(digits.train.x, digits.train.y), digits.val, epochs=3, batch_size=100, lr=0.003, progress=False)
    assert len(result.history) == 3 and max(student.sizes) == 100
    assert evaluate(student, digits.test)["accuracy"] > 0.7
    # a schedule needs the epoch's length, which a stream does not give: asked for explicitly, it is refused
    with pytest.raises(UserError, match="IterableDataset does not give"):
        d.fit(_Stream(digits.train.x, digits.train.y), epochs=1, schedule="cosine", progress=False)


def test_fit_honours_a_dataloaders_batches_and_refuses_another_batch_size(digits, digits_teacher):
    student = _Counting(_student(digits))
    loader = DataLoader(digits.train, batch_size=40, shuffle=True)
    Distiller(digits_teacher, student).fit(loader, epochs=1, progress=False)
    assert max(student.sizes) == 40
    with pytest.raises(UserError, match="DataLoader of batch_size=40"):
        Distiller(digits_teacher, student).fit(loader, epochs=1, batch_size=128, progress=False)


def test_supervised_is_a_method_of_the_api_and_needs_no_teacher(digits):
    student = _student(digits)
    result = Distiller(None, student, method="supervised").fit(digits.train, digits.val, epochs=5, lr=0.01, progress=False)
    assert result.best_val_score > 0.8
    with pytest.raises(UserError, match="needs a teacher"):
        Distiller(None, student, method="kd")


def test_fit_result_holds_the_best_epoch_student(digits, digits_teacher):
    student = _student(digits)
    result = Distiller(digits_teacher, student, temperature=1.0).fit(
        digits.train, digits.val, epochs=4, lr=0.003, progress=False)
    assert result.student is student
    assert evaluate(student, digits.val)["accuracy"] == pytest.approx(result.best_val_score)


def test_save_and_load_a_builder_model_and_evaluate_it(tmp_path, digits, digits_teacher, capsys):
    student = _student(digits)
    d = Distiller(digits_teacher, student, temperature=1.0)
    d.fit(digits.train, digits.val, epochs=2, lr=0.003, progress=False)
    folder = d.save(tmp_path / "saved", data={"dataset": "digits"})
    info = json.loads((folder / "distill.json").read_text())
    assert info["method"]["method"] == "kd" and info["method"]["temperature"] == 1.0 and len(info["history"]) == 2
    loaded = distill.load(folder)
    x = digits.test.x[:16]
    assert torch.equal(loaded(x), student.eval()(x))
    capsys.readouterr()
    assert main(["eval", str(folder), "--json"]) == 0  # `distill eval` reads what the API saved
    card = json.loads(capsys.readouterr().out)
    assert card["accuracy"] == pytest.approx(evaluate(student, digits.test)["accuracy"])


def test_eval_of_a_saved_model_without_its_data_asks_for_it(tmp_path, digits, capsys):
    student = _student(digits)
    folder = Distiller(None, student, method="supervised").save(tmp_path / "m")
    assert main(["eval", str(folder)]) == 2
    assert "does not record the data it was trained on" in capsys.readouterr().err
    assert main(["eval", str(folder), "data.dataset=digits", "--json"]) == 0


def test_save_and_load_a_users_own_module(tmp_path, digits):
    net = TinyNet(width=12)
    folder = Distiller(None, net, method="supervised").save(tmp_path / "own", init_kwargs={"width": 12})
    x = digits.test.x[:8]
    expected = net.eval()(x)
    assert torch.equal(distill.load(folder, model=TinyNet)(x), expected)  # class, called with init_kwargs
    assert torch.equal(distill.load(folder, model=lambda: TinyNet(width=12))(x), expected)  # a factory
    assert torch.equal(distill.load(folder, model=TinyNet(width=12))(x), expected)  # an instance to fill
    with pytest.raises(UserError, match="--allow-import custom_models"):
        distill.load(folder)  # rebuilding it would import the user's module: only when allowed
    assert torch.equal(distill.load(folder, allow_import=["custom_models"])(x), expected)
    with pytest.raises(UserError, match="does not match the model"):
        distill.load(folder, model=TinyNet(width=5))


def test_eval_refuses_a_training_state_with_a_pointer_to_save(tmp_path, digits):
    student = _student(digits)
    Distiller(None, student, method="supervised").fit(digits.train, digits.val, epochs=1, state_dir=tmp_path / "state", progress=False)
    with pytest.raises(UserError, match=r"training state.*Distiller.save"):
        from distill.checkpoint import load_model_file
        from distill.tasks.classification import build_from_record

        build_from_record(load_model_file(tmp_path / "state.best.safetensors")[1], "state.best.safetensors")
