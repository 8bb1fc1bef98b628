"""Many teachers as one: a weighted average of their logits or of their probabilities.

    combine="logits":  z(x) = Σ_i w_i · z_i(x) / Σ_i w_i
    combine="probs":   z(x) = log( Σ_i w_i · softmax(z_i(x)) / Σ_i w_i )
The "probs" output is a log-probability vector, so softmax(z) is exactly the averaged distribution (at T = 1);
at temperature T the soft targets are softmax(z / T) of that average, i.e. the average sharpened or softened
as one distribution. Being an nn.Module, an ensemble goes wherever a teacher goes (Distiller, methods, eval).
"""

from typing import Literal

import torch
from torch import nn

from distill.errors import UserError


class TeacherEnsemble(nn.Module):
    def __init__(self, teachers: list[nn.Module], weights: list[float] | None = None,
                 combine: Literal["logits", "probs"] = "probs"):
        super().__init__()
        if len(teachers) < 1:
            raise UserError("an ensemble needs at least one teacher")
        weights = [1.0] * len(teachers) if weights is None else [float(w) for w in weights]
        if len(weights) != len(teachers):
            raise UserError(f"ensemble weights: {len(weights)} weights for {len(teachers)} teachers; give one per teacher")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"ensemble weights must be >= 0 with a positive sum, got {weights}")
        if combine not in ("logits", "probs"):
            raise UserError(f"ensemble combine must be 'logits' or 'probs', got {combine!r}")
        self.teachers = nn.ModuleList(teachers)
        self.register_buffer("weights", torch.tensor(weights) / sum(weights), persistent=False)
        self.combine = combine

    def extra_repr(self) -> str:
        return f"combine={self.combine}"  # part of the teacher's identity (e.g. in a cache's teacher hash)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [teacher(x) for teacher in self.teachers]
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) != 1:
            raise UserError(f"ensemble teachers disagree on their output shapes {sorted(shapes)}: they must predict the same classes")
        stacked = torch.stack(outputs)  # (n_teachers, ..., C)
        w = self.weights.to(stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
        if self.combine == "logits":
            return (w * stacked).sum(0)
        # log Σ w_i p_i computed as logsumexp(log w_i + log p_i): stable for confident teachers
        return torch.logsumexp(torch.log(w) + torch.log_softmax(stacked, dim=-1), dim=0)
