"""Classification: accuracy / error count on labelled rows, and the image jitter used by Hinton's teacher.

`evaluate` works for any task whose models give one row of logits per label (images, tables, sentences, and
the counted tokens of a tagger): inputs may be a tensor or a dict of tensors.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader

from distill.tasks.base import Task

from pydantic import ValidationError

from distill.checkpoint import built_to_fit, load_model_file, load_weights
from distill.data import DataSplits, load_dataset
from distill.data.arrays import batch_collate
from distill.errors import UserError
from distill.students import build_model, model_config_adapter


class ClassificationTask(Task):
    """Images and tables: x is a float tensor per row, y its class; accuracy picks the best epoch."""

    name = "classification"
    metric = "accuracy"
    continuous_inputs = True

    def __init__(self, recipe=None, teacher_checkpoint: str | None = None):
        self.recipe = recipe
        self.teacher_checkpoint = teacher_checkpoint

    def baseline_score(self, data) -> float | None:
        return majority_accuracy(data.train.y, data.test.y)

    def evaluate(self, model, data, *, device="cpu", batch_size: int = 1024) -> dict:
        return evaluate(model, data, batch_size=batch_size, device=device)

    def load_data(self) -> DataSplits:
        return load_data(self.recipe)

    def build_model(self, model_cfg, data, teacher=None) -> nn.Module:
        return build_model(model_cfg, data.input_shape, data.num_classes)

    def load_model(self, path: str, data) -> nn.Module:
        return load_teacher(self.recipe, data, path)

    def check_compatible(self, teacher, student, data) -> None:
        check_compatible(teacher, student, data)

    def record(self, model_cfg, data) -> dict:
        return model_record(model_cfg, data, self.recipe)

    def saved_name(self, role: str) -> str:
        return f"{role}.safetensors"

    def save_model(self, model, path, record: dict) -> None:
        from distill.checkpoint import save_model

        save_model(path, model, record)

    def load_trained(self, model, path) -> nn.Module:
        load_weights(model, load_model_file(path)[0], source=str(path))
        return model

    def latency_inputs(self, data, batch_size: int) -> torch.Tensor:
        example = data.test.x[0]
        return example.unsqueeze(0).expand(batch_size, *example.shape).contiguous()


@torch.inference_mode()
def evaluate(model: nn.Module, dataset, *, batch_size: int = 1024, device: torch.device | str = "cpu") -> dict:
    """Accuracy, error count and mean cross-entropy over the labelled rows (label >= 0) of `dataset`."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in _batches(dataset, batch_size):
        x, y = send_to_device(x, device), y.to(device)
        keep = y >= 0
        if not keep.any():
            continue
        if keep.all():
            logits = model(x).float()
        elif isinstance(x, torch.Tensor):
            logits = model(x[keep]).float()  # unlabelled rows of images and tables are not run at all
        else:
            logits = model(x).float()[keep]  # a dict of sequences: rows are selected after the forward
        loss_sum += F.cross_entropy(logits, y[keep], reduction="sum").item()
        correct += (logits.argmax(-1) == y[keep]).sum().item()
        total += int(keep.sum())
    model.train(was_training)
    if total == 0:
        return {"score": float("nan"), "accuracy": float("nan"), "errors": 0, "loss": float("nan"), "n": 0}
    return {"score": correct / total, "accuracy": correct / total, "errors": total - correct, "loss": loss_sum / total, "n": total}


def majority_accuracy(train_y: torch.Tensor, test_y: torch.Tensor) -> float | None:
    """Accuracy on the labelled test rows of always answering the most common labelled training class."""
    train_y, test_y = train_y[train_y >= 0], test_y[test_y >= 0]
    if not len(train_y) or not len(test_y):
        return None
    return float((test_y == torch.bincount(train_y).argmax()).float().mean())


def _batches(data, batch_size: int):
    """In-order (x, y) batches: slices of an in-memory dataset, or a DataLoader over any other (x, y) dataset."""
    if isinstance(data, DataLoader):
        yield from data
    elif hasattr(data, "x") and hasattr(data, "y"):
        for start in range(0, len(data.y), batch_size):
            yield data.x[start : start + batch_size], data.y[start : start + batch_size]
    else:  # any other dataset, Subset or IterableDataset; text datasets gather their batches themselves
        yield from DataLoader(data, batch_size=batch_size, collate_fn=batch_collate)


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image of a (N, C, H, W) batch by its own random (dy, dx) in [-max_shift, max_shift],
    filling with zeros (Hinton et al. 2015 jitter the MNIST teacher's inputs by up to 2 pixels).
    Uses the global torch RNG, so checkpoints that restore it resume identically."""
    if max_shift <= 0:
        return x
    if x.dim() != 4:
        return x  # not an image batch: nothing to translate
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), device=x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


# ----------------------------------------------------------------------------- data and models of a recipe
def load_data(recipe) -> DataSplits:
    d = recipe.data
    return load_dataset(
        d.dataset, path=d.path, data_dir=d.data_dir, label_column=d.label_column, feature_columns=d.feature_columns,
        image_size=tuple(d.image_size), grayscale=d.grayscale, val_fraction=d.val_fraction,
        test_fraction=d.test_fraction, unlabelled_fraction=d.unlabelled_fraction, seed=d.split_seed, download=d.download,
    )


def model_record(model_cfg, data: DataSplits, recipe) -> dict:
    """What is stored with the weights so `distill eval` can rebuild the model and its data alone."""
    return {
        "model": model_cfg.model_dump(mode="json"),
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "data": data_record(recipe.data),
        "transfer": recipe.transfer.model_dump(mode="json"),
        "seed": recipe.seed,
    }


def data_record(data_cfg) -> dict:
    """The recipe's data section as stored with a model, its paths made absolute, so `distill eval` finds the data
    from any folder."""
    data = data_cfg.model_dump(mode="json")
    for key in ("path", "data_dir", "tokenizer"):
        if data.get(key) and Path(data[key]).expanduser().exists():  # (a tokenizer may be a hub id, not a path)
            data[key] = str(Path(data[key]).expanduser().resolve())
    return data


def build_from_record(record: dict, source: str) -> torch.nn.Module:
    if "model" not in record:
        raise UserError(f"{source} has no distill model description in its metadata (a training state, or a file from "
                        "another tool): save models with Distiller.save(DIR) or `distill run`, and give that")
    try:
        config = model_config_adapter.validate_python(record["model"])
        shape, classes = record.get("input_shape"), record.get("num_classes")  # (an imported class may need neither)
        shape, classes = tuple(shape) if shape is not None else None, int(classes) if classes is not None else None
        # sizes come from the file: checked against its tensors' shapes before anything is allocated
        return built_to_fit(lambda: build_model(config, shape, classes), source, own_code=config.kind == "import")
    except (ValidationError, KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{source}: its model description is invalid ({type(e).__name__}); re-save it with distill") from None


def check_compatible(teacher, student, data: DataSplits) -> None:
    """Teacher and student must map the same inputs to the same label space, and labels must fit it."""
    x = data.train.x[:2]
    with torch.inference_mode():
        t_shape, s_shape = tuple(teacher.eval()(x).shape), tuple(student.eval()(x).shape)
    teacher.train(), student.train()
    if t_shape != s_shape:
        raise UserError(f"teacher outputs shape {t_shape} but student outputs {s_shape}: both must predict the same {data.num_classes} classes")
    for split in ("train", "val", "test"):
        y = getattr(data, split).y
        if len(y) and (int(y.max()) >= s_shape[-1] or int(y.min()) < -1):
            bad = int(y.max()) if int(y.max()) >= s_shape[-1] else int(y.min())
            raise UserError(f"{split} label {bad} is out of range for a model with {s_shape[-1]} outputs: labels must be 0..{s_shape[-1] - 1} (or -1 for unlabelled)")


SPLIT_FIELDS = ("dataset", "path", "label_column", "feature_columns", "val_fraction", "test_fraction", "split_seed",
                "text_column", "train_rows", "val_rows", "test_rows", "unlabelled_rows")  # (text: rows drawn by seed)
OFFICIAL_TEST_SPLIT = ("mnist", "fashion-mnist")  # their test set is fixed: test_fraction plays no part


def check_same_split(teacher_data: dict, data: dict, path: str) -> None:
    """A teacher trained on another split may have seen our validation or test rows: refuse it."""
    for key in SPLIT_FIELDS:
        if key == "test_fraction" and data.get("dataset") in OFFICIAL_TEST_SPLIT:
            continue
        if key in teacher_data and not _same_value(key, teacher_data[key], data.get(key)):
            raise UserError(
                f"teacher {path} was trained with data.{key}={teacher_data[key]!r} but the recipe has {data.get(key)!r}: "
                f"set data.{key}={teacher_data[key]!r} so the teacher never saw the validation or test rows"
            )


def _same_value(key: str, a, b) -> bool:
    if key == "path" and a and b:  # stored absolute (data_record); a recipe may give it relative to the current folder
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def load_teacher(recipe, data: DataSplits, path: str) -> torch.nn.Module:
    """A teacher saved by distill: its stored architecture (else the recipe's), refused if trained on another split."""
    state, record = load_model_file(path)
    if "model" in record:
        check_same_split(record.get("data") or {}, recipe.data.model_dump(mode="json"), path)
        check_same_teacher_rows(record.get("transfer") or {}, recipe, path)
        if tuple(record["input_shape"]) != tuple(data.input_shape):
            raise UserError(f"teacher {path} takes inputs shaped {tuple(record['input_shape'])} but {data.name} has {tuple(data.input_shape)}: use a teacher trained on this data")
        model = build_from_record(record, path)
    else:
        model = build_model(recipe.teacher.model, data.input_shape, data.num_classes)
    load_weights(model, state, source=path)
    return model


def check_same_teacher_rows(teacher_transfer: dict, recipe, path: str) -> None:
    """With held-out transfer rows the teacher must not have trained on the students' rows."""
    t = recipe.transfer
    if t.rows != "heldout":
        return
    if teacher_transfer.get("rows") != "heldout" or teacher_transfer.get("heldout_fraction") != t.heldout_fraction:
        raise UserError(f"teacher {path} was not trained with transfer.rows=heldout and heldout_fraction={t.heldout_fraction}, "
                        "so it may have seen the students' held-out rows: train the teacher with this recipe")
