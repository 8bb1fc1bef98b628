"""A user's own model classes, importable as `custom_models` (tests/ is on sys.path): for --allow-import and
distill.load(model=...)."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """Not built by distill: a flat-input MLP with its own constructor arguments."""

    def __init__(self, width: int = 16, num_classes: int = 10, input_shape=(1, 8, 8)):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width), nn.ReLU(),
                                 nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)
