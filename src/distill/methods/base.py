"""What a distillation method is: a config (pydantic, with a `method` tag) and a loss for a batch.

A method never owns the training loop. The trainer
  1. calls `setup(student, example)` once, before it builds the optimizer: methods with trainable parts
     of their own (regressors, peer students) create them in `self.modules` here;
  2. calls `start_epoch(epoch)` at the start of every epoch (1-based), for schedules such as warm-ups;
  3. calls `sample_batch(student, batch)` (identity unless on-policy) and then `method(student, x, y)` for every
     batch and minimises the returned loss over the student's
     parameters and `method.parameters()`. `self.modules` is saved in resumable checkpoints.
Adding a method = one file in this package with a `@register`ed subclass; it is found automatically.
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
    needs_continuous_inputs: ClassVar[bool] = False  # perturbs or differentiates x (refused on token ids)
    reads_teacher_network: ClassVar[bool] = False  # needs the teacher network, not only its outputs (no logit cache)

    def __init__(self, config: MethodConfig, teacher=None):
        self.config = config
        self.teacher = teacher  # a signal: calling it on x gives teacher logits (see distill.signals)
        self.modules = nn.ModuleDict()  # trainable parts besides the student
        self.epoch = 1

    @classmethod
    def reads_network(cls, config: MethodConfig) -> bool:
        """Whether this config needs the teacher network itself, not only its outputs (a logit cache cannot serve it)."""
        return cls.reads_teacher_network

    @classmethod
    def check(cls, config: MethodConfig, teacher: nn.Module, student: nn.Module) -> None:
        """Refuse (UserError) a config that cannot work with these networks, before anything is trained."""

    def setup(self, student: nn.Module, example: torch.Tensor) -> None:
        """Build trainable parts that depend on the student; `example` is one training batch of inputs."""

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @abstractmethod
    def __call__(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (loss to minimise, named detached parts for logging)."""

    def sample_batch(self, student: nn.Module, batch: tuple) -> tuple:
        """The batch the step trains on; on-policy methods replace its sequences by the student's own samples
        (before the step's rows are counted, so the loss is normalised by the tokens actually generated)."""
        return batch

    def parameters(self) -> list[nn.Parameter]:
        return list(self.modules.parameters())


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"method name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls
