"""What a distillation method is: a config (pydantic, with a `method` tag) and a loss for a batch.

A method never owns the training loop: the trainer calls `method(student, x, y)` and steps the
optimizer. Methods that need extra trainable parts (regressors, other students) expose them via
`parameters()` so the trainer can optimise them too.
"""

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `distill methods`
    Config: ClassVar[type[MethodConfig]]
    needs_teacher: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, teacher=None):
        self.config = config
        self.teacher = teacher

    @abstractmethod
    def __call__(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (loss to minimise, named detached parts for logging)."""

    def parameters(self) -> list[nn.Parameter]:
        return []


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"method name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls
