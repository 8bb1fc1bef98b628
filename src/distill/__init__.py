"""distill: knowledge distillation for PyTorch — a small, fast student from a large teacher, with the numbers."""

from distill.api import Distiller
from distill.errors import UserError
from distill.losses import hard_label_loss, kd_loss, logit_mse, soft_target_cross_entropy, soft_target_kl
from distill.recipe import Recipe, load_recipe
from distill.runner import run_recipe
from distill.saving import load
from distill.train import FitResult, fit

__version__ = "0.1.0"
__all__ = [
    "Distiller", "FitResult", "Recipe", "UserError", "fit", "hard_label_loss", "kd_loss", "load", "load_recipe",
    "logit_mse", "run_recipe", "soft_target_cross_entropy", "soft_target_kl",
]
