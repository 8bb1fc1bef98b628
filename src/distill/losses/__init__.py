"""Distillation losses: pure functions on logits (no state, no nn.Module).

Each raises distill.errors.NonFiniteError when what it compares the student with (the teacher's logits, features,
hidden states, attention or derivatives) holds NaN or inf, rather than return a loss that may be finite while its
gradients are NaN (distill.finite); a -inf logit, a class of probability 0, is allowed where soft targets allow it.
A student's own NaN shows in the loss."""

from distill.losses.hard import hard_label_loss
from distill.losses.kd import SOFT_LOSSES, kd_loss
from distill.losses.kl import soft_target_cross_entropy, soft_target_kl
from distill.losses.mse import logit_mse

__all__ = [
    "SOFT_LOSSES",
    "hard_label_loss",
    "kd_loss",
    "logit_mse",
    "soft_target_cross_entropy",
    "soft_target_kl",
]
