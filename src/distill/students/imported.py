"""A user's own model class, named by import path: `model: {kind: import, target: "mypkg.models:Net", kwargs: {...}}`.

Importing runs the user's code, so a recipe alone never does it: the module must also be allowed on the command line
(`--allow-import mypkg.models`) or in the Python API (`distill.load(..., allow_import=["mypkg.models"])`). The
allow-list is per process and scoped with `allowed_imports(...)`.
"""

import contextlib
import importlib
import inspect
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from distill.errors import UserError

_allowed: list[str] = []  # module prefixes the user allowed on the command line / in the API call


class ImportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["import"] = "import"
    target: str = Field(..., pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
                        description="module:Class (or module:factory) returning an nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the class (JSON values)")


@contextlib.contextmanager
def allowed_imports(modules):
    """Allow `kind: import` models from these modules (and their sub-modules) inside the block."""
    before = list(_allowed)
    _allowed.extend(m for m in modules or () if m)
    try:
        yield
    finally:
        _allowed[:] = before


def is_allowed(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in _allowed)


def resolve_target(target: str):
    """The class or factory named by `module:attr`, imported only when the module is allowed."""
    module_name, _, attr = target.partition(":")
    if not is_allowed(module_name):
        raise UserError(f"model.target {target!r} imports {module_name}, which runs its code: allow it on the command "
                        f"line with --allow-import {module_name} (a recipe alone never imports code)")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as e:
        raise UserError(f"model.target {target!r}: cannot import {module_name} ({e}): install it or put it on PYTHONPATH") from None
    except AttributeError:
        raise UserError(f"model.target {target!r}: {module_name} has no {attr}: check the name") from None
    if not callable(obj):
        raise UserError(f"model.target {target!r} is not a class or function: name the model's class")
    return obj


def build_imported(config: ImportConfig, input_shape: tuple[int, ...] | None, num_classes: int | None) -> nn.Module:
    """config.target(**kwargs); `input_shape` and `num_classes` are passed too when its signature takes them and
    the recipe does not set them."""
    factory = resolve_target(config.target)
    kwargs = dict(config.kwargs)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    for name, value in (("input_shape", input_shape), ("num_classes", num_classes)):
        if name in params and name not in kwargs and value is not None:
            kwargs[name] = tuple(value) if name == "input_shape" else value
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise UserError(f"model.target {config.target!r} does not accept kwargs {sorted(kwargs)} ({e}): fix model.kwargs") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.target {config.target!r} returned {type(model).__name__}, not a torch nn.Module")
    return model
