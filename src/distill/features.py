"""Intermediate activations of a model, chosen by module name, for feature-based distillation methods.

Layers are named as in `dict(model.named_modules())` (e.g. "net.2" in an MLP, "features.3" in a CNN), so a
recipe can point at any layer of an unmodified model (torchdistill's approach). Forward hooks are registered for
one forward pass and removed right after it, so nothing stays attached to the model and nothing recorded
outlives the batch. A model wrapped by Accelerate/DDP (the real model in `.module`, names prefixed "module.")
accepts the same names as the bare model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from accelerate.utils import send_to_device
from torch import Tensor, nn

from distill.errors import UserError

_MAX_LISTED = 60  # a ResNet-50 has ~150 named modules; a longer listing drowns the error


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP/Accelerate-style wrapper (one that keeps it in `.module`), else the model."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def layer_names(model: nn.Module) -> list[str]:
    """Names a user can give: every named submodule of the (unwrapped) model except the model itself."""
    return [name for name, _ in _unwrapped(model).named_modules() if name]


def resolve_layers(model: nn.Module, names: Sequence[str], role: str = "model") -> dict[str, nn.Module]:
    """Map each name to its submodule; an unknown name is a UserError that lists the valid ones."""
    inner = _unwrapped(model)
    modules = dict(inner.named_modules())
    found = {}
    for name in names:
        key = name[len("module."):] if inner is not model and name.startswith("module.") else name
        if not key or key not in modules:
            valid = layer_names(model)
            shown = ", ".join(valid[:_MAX_LISTED])
            more = f", ... ({len(valid) - _MAX_LISTED} more)" if len(valid) > _MAX_LISTED else ""
            raise UserError(f"{role} has no layer named {name!r}; valid layer names: {shown}{more}")
        found[name] = modules[key]
    return found


@contextmanager
def capture(model: nn.Module, names: Sequence[str], role: str = "model") -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the named layers during the forward passes run inside the block.

        with capture(student, ["net.2"]) as feats:
            logits = student(x)
        feats["net.2"]   # the output of student.net[2] for x, still in the autograd graph

    Each output is cloned in the hook: a later in-place op (e.g. ReLU(inplace=True) after a conv) would otherwise
    change the recorded tensor. Clone is differentiable, so gradients still reach the layer. If a layer runs more
    than once in the block (weight sharing), the last call wins. Hooks only record, and are removed on exit.
    """
    names = list(dict.fromkeys(names))  # one hook per layer even if a layer is listed twice
    layers = resolve_layers(model, names, role)
    feats: dict[str, Tensor] = {}
    handles = []

    def hook_for(name):
        def hook(module, inputs, output):
            if not isinstance(output, Tensor):
                raise UserError(
                    f"{role} layer {name!r} outputs a {type(output).__name__}, not a tensor; choose a layer whose "
                    "output is one tensor (e.g. a conv, linear or activation layer)"
                )
            feats[name] = output.clone()

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        yield feats
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in feats]
    if missing:
        raise UserError(f"{role} layer(s) {', '.join(map(repr, missing))} did not run in the forward pass; choose layers its forward() uses")


def teacher_model(teacher, need: str = "intermediate layers") -> nn.Module:
    """The raw float32 teacher network behind a live signal; these methods cannot work from stored outputs."""
    model = getattr(teacher, "model", None)
    if not isinstance(model, nn.Module):
        raise UserError(f"this method reads the teacher's {need}, so it needs a live teacher network "
                        "(distill.signals.LiveTeacher), not only its stored outputs (e.g. from a cache)")
    if getattr(teacher, "dtype", None) is not None:
        raise UserError(f"this method reads the teacher's {need} in float32: set teacher.precision: fp32")
    return model


def _cached(teacher) -> bool:
    return callable(getattr(teacher, "features", None))  # distill.signals.CachedTeacher


def teacher_forward(teacher, x: Tensor, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Teacher logits and the named teacher activations from one forward pass, with no autograd.

    `teacher` is a live signal (distill.signals.LiveTeacher) whose `.model` is the raw network, or a
    CachedTeacher whose cache stores these layers. Like the signal, the live pass runs in eval mode under
    inference_mode; results are cloned outside it so the student's loss can save them for backward
    (inference tensors cannot be saved).
    """
    if _cached(teacher):
        return teacher(x), teacher.features(x, names)
    model = teacher_model(teacher)
    model.eval()
    with torch.inference_mode(), capture(model, names, role="teacher") as feats:
        logits = model(x)
    return logits.clone(), {name: f.clone() for name, f in feats.items()}


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def probe(model: nn.Module, x: Tensor, names: Sequence[str], role: str = "model") -> dict[str, Tensor]:
    """The named activations for `x`, for reading shapes in `setup`, without side effects on the model:
    eval mode (BatchNorm running statistics stay untouched, dropout draws no random numbers), no autograd,
    and every module's train/eval flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with capture(model, names, role) as feats:
            model(send_to_device(x, _device(model)))
    finally:
        for m, training in modes:
            m.train(training)
    return feats


def teacher_probe(teacher, x: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """The named teacher activations for `x`, for reading shapes in `setup`: from the cache for a CachedTeacher
    (fed this batch), else `probe` on the live network."""
    if _cached(teacher):
        return teacher.features(x, names)
    return probe(teacher_model(teacher), x, names, "teacher")
