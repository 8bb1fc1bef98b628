"""The teacher as a live forward pass: eval mode, no autograd, never trained; optionally in half precision."""

import copy

import torch
from torch import nn

from distill.errors import UserError
from distill.finite import require_finite

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def to_dtype(inputs, dtype: torch.dtype):
    """The floating tensors of a batch's inputs (a tensor, or a dict of them) in `dtype`; token ids and masks stay."""
    if isinstance(inputs, dict):
        return {k: to_dtype(v, dtype) for k, v in inputs.items()}
    return inputs.to(dtype) if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() else inputs


class LiveTeacher:
    """Wraps a teacher network so that calling it gives logits for a batch, with no autograd graph.

    The forward runs under torch.inference_mode() (cheapest mode); the result is cloned outside it
    so the student's loss can save it for backward (inference tensors cannot be saved).
    precision "fp16"/"bf16" runs a half-precision copy of the teacher (half the memory and, on GPUs, about
    twice the speed; the caller's model is left as it is) and returns float32 logits, so the loss is computed
    in full precision.
    """

    def __init__(self, model: nn.Module, precision: str = "fp32"):
        if precision not in ("fp32", *HALF):
            raise UserError(f"teacher precision must be fp32, fp16 or bf16, got {precision!r}")
        self.dtype = HALF.get(precision)
        self.model = (copy.deepcopy(model).to(self.dtype) if self.dtype else model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if any(m.training for m in self.model.modules()):  # a user's loop may have called .train() on everything
            self.model.eval()  # (checked first: eval() walks and sets every module, a cost paid on every batch)
        with torch.inference_mode():
            logits = self.model(x if self.dtype is None else to_dtype(x, self.dtype))
        # a student would silently learn NaN from them (NonFiniteError, with the step when training)
        require_finite(logits, "the teacher's logits", "check the teacher (distill eval it) and "
                       f"{'teacher.precision (use fp32)' if self.dtype else 'its inputs'}")
        # outside inference mode, .float()/.clone() make a normal tensor that autograd may save
        return logits.float() if self.dtype is not None else logits.clone()
