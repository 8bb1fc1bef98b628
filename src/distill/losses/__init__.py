"""Distillation losses: pure functions on logits (no state, no nn.Module)."""

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
