"""Boundary supporting samples (Heo, Lee, Yun & Choi, AAAI 2019,
"Knowledge Distillation with Adversarial Samples Supporting Decision Boundary")."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.finite import require_finite

__all__ = ["boundary_samples"]


def _check_classes(name: str, c, n: int, num_classes: int) -> Tensor:
    if not isinstance(c, Tensor) or c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
        got = c.dtype if isinstance(c, Tensor) else type(c).__name__
        raise UserError(f"{name} must be an integer tensor of class indices, got {got}")
    if c.shape != (n,):
        raise UserError(f"{name} must have shape ({n},) (one class per sample), got {tuple(c.shape)}")
    if n and (int(c.min()) < 0 or int(c.max()) >= num_classes):
        raise UserError(f"{name} must hold classes in [0, {num_classes}), got values in [{int(c.min())}, {int(c.max())}]")
    return c.long()


def boundary_samples(
    teacher: nn.Module,
    x: Tensor,
    base: Tensor,
    target: Tensor,
    *,
    steps: int = 10,
    step_size: float = 0.03,
    clamp: tuple[float, float] | None = None,
) -> Tensor:
    """Move each sample towards the teacher's decision boundary between its base class b and a target class k.

    Heo et al. (2019), as in the authors' code (bhheo/BSS_distillation, attacks/attack_BSS.py):

        L_k(x)    = z_b(x) - z_k(x)                      (teacher logits; > 0 while the teacher says b)
        x^{i+1}   = x^i - η · (L_k(x^i) + 1e-4) · ∇x L_k(x^i) / ‖∇x L_k(x^i)‖₂

    for i = 0 .. steps-1. A sample stops moving as soon as the teacher no longer predicts b at x^i
    (it has reached or just crossed the boundary); the loop ends early when every sample has stopped.
    The step length η·L_k shrinks with the margin, so samples slow down as they near the boundary.
    η is in input units per logit of margin, hence depends on the input scale (see the bss method).
    ``clamp=(lo, hi)`` keeps the samples in the data's value range after every step.
    Rows whose teacher prediction is not ``base`` to begin with are returned unchanged.

    Teacher logits with NaN or inf (a broken teacher, or NaN in x) raise NonFiniteError.
    Only input gradients are taken (torch.autograd.grad w.r.t. x), so the teacher's parameters never
    receive .grad; the teacher is used as given (put it in eval mode first). Returns detached samples
    with the shape of ``x``.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise UserError(f"x must be a floating-point tensor with a batch dimension, got {getattr(x, 'dtype', type(x).__name__)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not math.isfinite(step_size) or step_size <= 0:
        raise UserError(f"step_size must be a finite number > 0, got {step_size!r}")
    if clamp is not None and not (len(clamp) == 2 and clamp[0] < clamp[1]):
        raise UserError(f"clamp must be (lo, hi) with lo < hi, got {clamp!r}")

    n = x.shape[0]
    adv = x.detach().clone()
    if n == 0:
        return adv
    with torch.enable_grad():
        adv.requires_grad_(True)
        z = teacher(adv)
        b = _check_classes("base", base, n, z.shape[-1]).to(z.device)
        k = _check_classes("target", target, n, z.shape[-1]).to(z.device)
        if bool((b == k).any()):
            raise UserError("target must differ from base in every row (the boundary between a class and itself is empty)")
        b, k = b.unsqueeze(1), k.unsqueeze(1)
        shape = (n,) + (1,) * (x.dim() - 1)
        for i in range(steps):
            if i:
                adv.requires_grad_(True)
                z = teacher(adv)
            # argmax would take a NaN logit for the prediction and stop the sample silently
            require_finite(z.detach(), "the teacher's logits", "check the teacher and x")
            active = z.detach().argmax(-1) == b.squeeze(1)
            if not bool(active.any()):
                break
            margin = (z.gather(1, b) - z.gather(1, k)).squeeze(1)
            (grad,) = torch.autograd.grad(margin.sum(), adv)
            norm = grad.reshape(n, -1).norm(dim=1).clamp_min(1e-12)
            scale = step_size * (margin.detach() + 1e-4) / norm * active
            adv = adv.detach() - scale.reshape(shape) * grad
            if clamp is not None:
                adv = adv.clamp(clamp[0], clamp[1])
    return adv.detach()
