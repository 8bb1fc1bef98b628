"""Fully connected classifier (Hinton et al. 2015, §3: 784-1200-1200-10 teacher, 784-800-800-10 student)."""

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn


class MLPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["mlp"] = "mlp"
    hidden: list[PositiveInt] = Field(default_factory=lambda: [256, 256], description="units per hidden layer")
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    input_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the (flattened) input")
    max_norm: float | None = Field(None, gt=0.0, description="cap on the L2 norm of each unit's incoming weights")


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    def __init__(self, config: MLPConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.config = config
        width = int(torch.Size(input_shape).numel())
        layers: list[nn.Module] = [nn.Flatten()]
        if config.input_dropout:
            layers.append(nn.Dropout(config.input_dropout))
        for units in config.hidden:
            layers += [nn.Linear(width, units), _ACTIVATIONS[config.activation]()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = units
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Max-norm weight constraint (Srebro & Shraibman; used with dropout by Hinton's MNIST teacher):
        after each step, rescale every unit's incoming weight vector to norm <= max_norm."""
        if self.config.max_norm is None:
            return
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(cap_row_norms(layer.weight, self.config.max_norm))


def cap_row_norms(weight: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Every row scaled to L2 norm <= max_norm, as torch.renorm(weight, 2, 0, max_norm) does: a row of norm
    n > max_norm is multiplied by max_norm / (n + 1e-7). Written with a row norm and elementwise ops because
    FSDP's sharded tensors support those and have no renorm."""
    norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    return weight * torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
