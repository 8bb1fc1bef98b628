"""Saving what the Python API trained, and loading it back: `Distiller.save(DIR)` / `distill.load(DIR)`.

A saved model is a folder:
  model.safetensors  the weights (no pickle), with the model's description in the metadata, as in a run's
                     student.safetensors, so `distill eval DIR` (or DIR/model.safetensors) evaluates it
  distill.json       {"format", "task": "classification", "model": how to rebuild it, "data": the data it was trained
                     on when known, "method": the method and its settings, "fit": best epoch and score, "history"}

How the model is rebuilt: a model built by distill (`distill.students.build_model`, `kind: mlp | cnn | import`)
carries its description; for any other nn.Module, `distill.load(DIR, model=...)` takes the class (called with the
saved `init_kwargs`), a factory returning the module, or an instance to fill.
"""

import inspect
import json
from pathlib import Path

from torch import nn

from distill.checkpoint import load_model_file, load_weights, save_model
from distill.durable import atomic_write_text, checked_json
from distill.errors import UserError
from distill.report import strict_json
from distill.students.imported import allowed_imports

FORMAT = "distill.model/1"
WEIGHTS, RECORD = "model.safetensors", "distill.json"


def _describe(model: nn.Module, init_kwargs: dict | None, data: dict | None) -> dict:
    """How to rebuild `model`: its distill description, or its class's import path with init_kwargs."""
    described = getattr(model, "distill_config", None)
    if isinstance(described, dict) and "model" in described:
        record = dict(described)
    else:
        cls = type(model)
        record = {"model": {"kind": "import", "target": f"{cls.__module__}:{cls.__qualname__}", "kwargs": dict(init_kwargs or {})}}
    if data is not None:
        from distill.recipe import DataConfig

        record["data"] = DataConfig(**data).model_dump(mode="json")
    return record


def save(path, model: nn.Module, *, method=None, fit=None, init_kwargs: dict | None = None, data: dict | None = None) -> Path:
    """Write model.safetensors and distill.json into folder `path` (created; files written atomically)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder} ({e.strerror}): save to a writable folder") from None
    record = _describe(model, init_kwargs, data)
    save_model(folder / WEIGHTS, model, record)
    info = {"format": FORMAT, "task": "classification", **record,
            "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    if method is not None:
        info["method"] = method.config.model_dump(mode="json")
    if fit is not None:
        info["fit"] = {"best_epoch": fit.best_epoch, "best_val_score": fit.best_val_score,
                       "best_val_loss": fit.best_val_loss, "train_seconds": fit.train_seconds}
        info["history"] = fit.history
    # no NaN (a fit without validation has no best score), and a sha256 that distill.load and `distill eval` check
    atomic_write_text(folder / RECORD, checked_json(json.loads(strict_json(info)), indent=1, allow_nan=False))
    return folder


def load(path, model=None, *, allow_import=()) -> nn.Module:
    """The model saved in folder `path` (or a .safetensors file written by distill), in eval mode.

    model: None to rebuild it from its description (models built by distill; `kind: import` models only when their
    module is in allow_import), an nn.Module class (called with the saved init_kwargs), a function returning the
    module, or an nn.Module instance whose weights are replaced."""
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise UserError(f"{path} holds no {WEIGHTS}: give a folder written by Distiller.save (or a .safetensors file)")
    state, record = load_model_file(weights)
    if isinstance(model, nn.Module):
        target = model
    elif model is not None:
        target = _call(model, record)
    else:
        if "model" not in record:
            raise UserError(f"{weights} has no model description: pass the model's class or a factory, "
                            "distill.load(path, model=MyNet)")
        from distill.tasks.classification import build_from_record

        with allowed_imports(allow_import):
            target = build_from_record(record, str(weights))
    load_weights(target, state, source=str(weights))
    return target.eval()


def _call(factory, record: dict) -> nn.Module:
    kwargs = (record.get("model") or {}).get("kwargs") or {}
    obj = factory(**kwargs) if inspect.isclass(factory) else factory()
    if not isinstance(obj, nn.Module):
        raise UserError(f"distill.load: model={factory!r} gave {type(obj).__name__}, not an nn.Module: pass the model's "
                        "class, a function returning it, or an instance")
    return obj

