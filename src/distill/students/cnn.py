"""Small convolutional classifier: [conv-(bn)-relu-maxpool] x len(channels), then an MLP head."""

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn


class CNNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["cnn"] = "cnn"
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64], min_length=1)
    kernel_size: int = Field(3, ge=1)
    batch_norm: bool = True
    hidden: list[PositiveInt] = Field(default_factory=lambda: [128])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class CNN(nn.Module):
    def __init__(self, config: CNNConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if len(input_shape) != 3:
            from distill.errors import UserError

            raise UserError(
                f"model.kind cnn needs image inputs shaped (C, H, W), but the data has shape {tuple(input_shape)}; "
                "use model.kind: mlp for tables"
            )
        self.config = config
        channels, height, width = input_shape
        blocks: list[nn.Module] = []
        for out in config.channels:
            blocks.append(nn.Conv2d(channels, out, config.kernel_size, padding=config.kernel_size // 2))
            if config.batch_norm:
                blocks.append(nn.BatchNorm2d(out))
            blocks.append(nn.ReLU())
            if min(height, width) >= 2:  # pool only while there is something left to pool
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            channels = out
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.Flatten()]
        size = channels * height * width
        for units in config.hidden:
            head += [nn.Linear(size, units), nn.ReLU()]
            if config.dropout:
                head.append(nn.Dropout(config.dropout))
            size = units
        head.append(nn.Linear(size, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
