"""Gaussian perturbation of teacher logits: Sau & Balasubramanian (2016), "Deep Model Compression:
Distilling Knowledge from Noisy Teachers" (arXiv:1610.09650)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.errors import UserError
from distill.losses.kl import _check_logits

__all__ = ["perturb_logits", "NOISE_MODES"]

NOISE_MODES = ("multiplicative", "additive")


def perturb_logits(logits: Tensor, sigma: float, mode: str = "multiplicative", generator: torch.Generator | None = None) -> Tensor:
    """Logits with element-wise Gaussian noise, xi ~ N(0, sigma^2) drawn independently per element:

        multiplicative (the paper):  z~ = z * (1 + xi)
        additive:                    z~ = z + xi

    The noise comes from ``generator``, or torch's global RNG when it is None (so a seeded, checkpointed
    training run draws the same noise again). sigma == 0 returns ``logits`` itself and draws nothing.
    Returns a new tensor of the same shape and dtype; ``logits`` is not modified.
    """
    _check_logits("logits", logits)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise UserError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if mode not in NOISE_MODES:
        raise UserError(f"mode must be one of {', '.join(map(repr, NOISE_MODES))}, got {mode!r}")
    if sigma == 0:
        return logits
    xi = torch.randn(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device) * sigma
    return logits * (1 + xi) if mode == "multiplicative" else logits + xi
