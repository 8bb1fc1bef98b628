"""The teacher as a live forward pass: eval mode, no autograd, never trained."""

import torch
from torch import nn


class LiveTeacher:
    """Wraps a teacher network so that calling it gives logits for a batch, with no autograd graph.

    The forward runs under torch.inference_mode() (cheapest mode); the result is cloned outside it
    so the student's loss can save it for backward (inference tensors cannot be saved).
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()  # a user's loop may have called .train() on everything
        with torch.inference_mode():
            logits = self.model(x)
        return logits.clone()
