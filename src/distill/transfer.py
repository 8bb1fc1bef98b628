"""The transfer set: which rows the students learn from, and Hinton's "omitted 3" bias correction.

Hinton, Vinyals & Dean (2015) §3: a student distilled on a transfer set with no 3s at all still learns
3s from the soft targets of the other digits ("mythical" 3s); its errors on 3s mostly come from too low
a bias for class 3, and raising that bias (by 3.5 in the paper) recovers most of them.

- rows "train": students learn from the teacher's own training rows (the default).
- rows "heldout": the training split is cut in two (stratified, seeded by data.split_seed): the teacher
  trains on one part, the students on the other, which the teacher never saw.
- omit_classes: rows of these classes are removed from the students' rows (scratch and distilled alike,
  so only the teacher's soft targets can teach those classes).
- unlabelled rows (data.unlabelled_fraction) get the teacher's argmax as pseudo-labels in the methods.
"""

import torch
from sklearn.model_selection import train_test_split
from torch import nn

from distill.data import ArrayDataset
from distill.errors import UserError
from distill.tasks.classification import evaluate


def split_rows(train: ArrayDataset, rows: str, heldout_fraction: float, omit_classes: list[int],
               seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """(teacher's training rows, students' transfer rows) of the training split."""
    teacher_rows, student_rows = train, train
    if rows == "heldout":
        index = torch.arange(len(train))
        try:
            t_idx, s_idx = train_test_split(index.numpy(), test_size=heldout_fraction, random_state=seed,
                                            stratify=train.y.numpy())
        except ValueError as e:
            raise UserError(f"transfer.heldout_fraction={heldout_fraction} cannot split {len(train)} training rows "
                            f"by class ({e}): use a fraction nearer 0.5 or more data") from None
        t_idx, s_idx = torch.as_tensor(sorted(t_idx)), torch.as_tensor(sorted(s_idx))
        teacher_rows = ArrayDataset(train.x[t_idx], train.y[t_idx])
        student_rows = ArrayDataset(train.x[s_idx], train.y[s_idx])
    if omit_classes:
        keep = ~torch.isin(student_rows.y, torch.as_tensor(omit_classes))
        if not keep.any():
            raise UserError(f"transfer.omit_classes={omit_classes} leaves no rows to learn from: omit fewer classes")
        student_rows = ArrayDataset(student_rows.x[keep], student_rows.y[keep])
    return teacher_rows, student_rows


def recipe_rows(recipe, train: ArrayDataset) -> tuple[ArrayDataset, ArrayDataset]:
    """split_rows with the recipe's transfer section (and data.split_seed): what the runner, the cache and the
    bench all mean by the teacher's and the students' rows."""
    t = recipe.transfer
    return split_rows(train, t.rows, t.heldout_fraction, t.omit_classes, recipe.data.split_seed)


class BiasShifted(nn.Module):
    """model(x) + shift: the student with the logits (biases) of some classes raised. No new parameters."""

    def __init__(self, model: nn.Module, shift: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("shift", shift.detach().clone().float(), persistent=False)

    def forward(self, x):
        return self.model(x) + self.shift.to(x.device)


def class_shift(num_classes: int, classes: list[int], value: float) -> torch.Tensor:
    shift = torch.zeros(num_classes)
    shift[classes] = value
    return shift


def check_bias_rows(val: ArrayDataset, classes: list[int]) -> None:
    if len(val) == 0 or not torch.isin(val.y, torch.as_tensor(classes)).any():
        raise UserError("transfer.bias_correction: auto chooses the bias on validation rows of the omitted classes, "
                        "and there are none: set data.val_fraction > 0 or give the bias as a number")


def choose_bias(model: nn.Module, val: ArrayDataset, classes: list[int], num_classes: int,
                grid: torch.Tensor | None = None) -> float:
    """The bias added to the omitted classes' logits that maximises accuracy on the validation rows (which
    contain those classes); ties go to the smallest bias. The test rows are never looked at."""
    check_bias_rows(val, classes)
    grid = torch.arange(0.0, 10.01, 0.25) if grid is None else grid
    best, best_acc = 0.0, -1.0
    for b in grid.tolist():
        acc = evaluate(BiasShifted(model, class_shift(num_classes, classes, b)), val)["accuracy"]
        if acc > best_acc + 1e-12:
            best, best_acc = b, acc
    return best


def errors_on_classes(model: nn.Module, data: ArrayDataset, classes: list[int]) -> dict[str, dict]:
    """{class: {"errors": e, "n": rows}} on the rows of each class."""
    out = {}
    for c in classes:
        mask = data.y == c
        scores = evaluate(model, ArrayDataset(data.x[mask], data.y[mask]))
        out[str(c)] = {"errors": scores["errors"], "n": scores["n"]}
    return out
