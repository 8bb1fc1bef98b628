"""Feature-mimicry losses: FitNets hints (Romero et al., ICLR 2015) and attention transfer
(Zagoruyko & Komodakis, ICLR 2017)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import UserError
from distill.finite import check_targets, finite
from distill.losses.kl import _upcast

__all__ = ["hint_loss", "attention_map", "attention_transfer_loss"]


def _check_feature(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise UserError(f"{name} must be a floating-point tensor, got {x.dtype}")


def hint_loss(regressed: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNets hint loss: mean squared error between the regressed student feature and the teacher's hint.

        loss = (1 / numel) · Σ_i (r(v_g(x))_i − u_h(x)_i)²

    Romero et al. (2015), "FitNets: Hints for Thin Deep Nets", eq. 3, write ½‖u_h − r(v_g)‖² summed over a
    sample; the mean over all elements (nn.MSELoss) differs by a constant factor only, and keeps the loss on the
    same scale whatever the layer width, so one hint weight suits many layer choices. Shapes must be identical.
    Half-precision inputs are computed in float32.
    """
    _check_feature("regressed", regressed)
    _check_feature("teacher_feature", teacher_feature)
    if regressed.shape != teacher_feature.shape:
        raise UserError(f"regressed student feature shape {tuple(regressed.shape)} and teacher feature shape "
                        f"{tuple(teacher_feature.shape)} must be identical")
    loss = (_upcast(regressed) - _upcast(teacher_feature)).pow(2).mean()
    if not finite(loss):
        check_targets(teacher_feature=teacher_feature, rows=False)
    return loss


def _check_p(p) -> float:
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise UserError(f"p must be a number > 0, got {p!r}") from None
    if isinstance(p, bool) or not math.isfinite(value) or value <= 0:
        raise UserError(f"p must be a finite number > 0, got {p!r}")
    return value


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention map of a 4-D activation A (N, C, H, W), flattened and L2-normalised per sample.

        Q = Σ_c |A_c|^p          (N, H, W) -> (N, H·W)
        attention_map = Q / ‖Q‖₂

    Zagoruyko & Komodakis (2017), "Paying More Attention to Attention", §3.1 (F_sum^p) and eq. 2. An all-zero
    map (e.g. dead ReLUs) stays zero instead of dividing by zero. |a|^p is taken as 0 with gradient 0 at a = 0,
    so p < 1 gives no infinite gradients at the exact zeros that ReLU outputs are full of.
    """
    _check_feature("feature", feature)
    p = _check_p(p)
    if feature.dim() != 4:
        raise UserError(f"attention maps need a 4-D (N, C, H, W) activation, got shape {tuple(feature.shape)}")
    a = _upcast(feature).abs()
    zero = a == 0
    # Double where: pow's gradient at 0 is inf for p < 1, and inf·0 = nan would leak through a single where.
    powered = torch.where(zero, 0.0, torch.where(zero, 1.0, a).pow(p))
    q = powered.sum(dim=1).flatten(1)
    return F.normalize(q, p=2, dim=1)


def attention_transfer_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    """Attention-transfer loss for one pair of layers: mean over the batch of the squared L2 distance.

        loss = (1 / N) · Σ_n ‖ Q_s,n / ‖Q_s,n‖₂ − Q_t,n / ‖Q_t,n‖₂ ‖₂²

    with Q = Σ_c |A_c|^p (see attention_map). Zagoruyko & Komodakis (2017), eq. 2, with the 2-norm of the
    difference squared (each term lies in [0, 4]). Their reference code instead averages (·)² over batch *and*
    the H·W positions and weights it by β/2 (β = 1000), i.e. it equals β / (2·H·W) times this loss.
    Batch sizes must match. If the spatial sizes differ, the student's (unnormalised) map Q_s is resized to the
    teacher's H×W by bilinear interpolation before normalising; the channel counts may differ freely.
    """
    _check_feature("student_feature", student_feature)
    _check_feature("teacher_feature", teacher_feature)
    p = _check_p(p)
    for name, f in (("student_feature", student_feature), ("teacher_feature", teacher_feature)):
        if f.dim() != 4:
            raise UserError(f"attention transfer needs 4-D (N, C, H, W) activations, {name} has shape {tuple(f.shape)}")
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise UserError(f"student and teacher batch sizes differ: {student_feature.shape[0]} vs {teacher_feature.shape[0]}")
    q_t = attention_map(teacher_feature, p)
    size = teacher_feature.shape[-2:]
    if student_feature.shape[-2:] == size:
        q_s = attention_map(student_feature, p)
    else:
        raw = attention_map(student_feature, p).unflatten(1, student_feature.shape[-2:])  # scale is irrelevant
        resized = F.interpolate(raw.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)
        q_s = F.normalize(resized.flatten(1), p=2, dim=1)
    dtype = torch.promote_types(q_s.dtype, q_t.dtype)
    loss = (q_s.to(dtype) - q_t.to(dtype)).pow(2).sum(dim=1).mean()
    if not finite(loss):  # NaN and inf reach the maps' norms, hence the loss
        check_targets(teacher_feature=teacher_feature, rows=False)
    return loss
