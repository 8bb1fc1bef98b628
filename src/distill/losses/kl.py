"""Soft-target losses from Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

Also holds the small shape/mask/reduction helpers shared by the other loss modules,
so every loss validates its arguments and counts rows the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.errors import UserError
from distill.finite import check_targets, finite

__all__ = ["soft_target_kl", "soft_target_cross_entropy"]

_ROW_REDUCTIONS = ("batchmean", "sum", "none")


def _check_temperature(temperature) -> float:
    # bool is an int subclass; True as a temperature is certainly a mistake.
    if isinstance(temperature, bool):
        raise UserError(f"temperature must be a number > 0, got {temperature!r}")
    try:
        value = float(temperature)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"temperature must be a number > 0, got {temperature!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"temperature must be > 0 and finite, got {value}")
    return value


def _check_reduction(reduction, allowed: tuple[str, ...]) -> str:
    if reduction not in allowed:
        hint = " (torch's 'mean' also averages over classes; use 'batchmean')" if reduction == "mean" else ""
        raise UserError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}{hint}")
    return reduction


def _upcast(x: Tensor) -> Tensor:
    # Half-precision softmax/log-sums lose too much; compute in float32 at least.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise UserError(f"{name} must be a floating-point tensor, got {x.dtype}; convert it with .float()")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise UserError(f"{name} must have a non-empty last (class) dimension, got shape {tuple(x.shape)}")


def _check_pair(student_logits, teacher_logits) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise UserError(
            f"student_logits shape {tuple(student_logits.shape)} and teacher_logits shape "
            f"{tuple(teacher_logits.shape)} must be identical"
        )


def _flat_mask(mask, leading: torch.Size, device) -> Tensor | None:
    """Validate ``mask`` against the leading (row) shape and flatten it to [N]."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise UserError(f"mask must be a bool tensor, got {got}; pass mask.bool()")
    if mask.shape != leading:
        raise UserError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(leading)}")
    return mask.reshape(-1).to(device)


def _rows(x: Tensor) -> Tensor:
    """[..., C] -> [N, C] in at least float32."""
    return _upcast(x).reshape(-1, x.shape[-1])


def _select(x2d: Tensor, keep: Tensor | None) -> Tensor:
    # Drop padding rows *before* computing anything, so garbage in them (e.g. -inf
    # logits) can never leak NaNs into the loss or its gradient.
    return x2d if keep is None else x2d[keep]


def _reduce_rows(per_row: Tensor, keep: Tensor | None, n_rows: int, leading: torch.Size, reduction: str) -> Tensor:
    """Reduce a per-kept-row loss. ``batchmean`` divides by the number of kept rows."""
    if reduction == "none":
        if keep is None:
            return per_row.reshape(leading)
        out = per_row.new_zeros(n_rows)
        out[keep] = per_row  # differentiable scatter; dropped rows stay exactly 0
        return out.reshape(leading)
    total = per_row.sum()  # empty sum is a 0 still connected to the inputs' graph
    if reduction == "sum":
        return total
    return total / max(per_row.shape[0], 1)


def _kl_rows(log_pt: Tensor, log_ps: Tensor) -> Tensor:
    """KL per row from log-probabilities: sum over the last dim of p_t·(log p_t − log p_s), with 0·log 0 = 0.
    where() rather than xlogy: p_t == 0 with log p_t == -inf would otherwise give 0 · -inf = nan, and xlogy's
    gradient with respect to a teacher probability of 0 is log 0 (a teacher that requires grad would get nan).
    `!= 0` rather than `> 0`: a NaN p_t must reach the value (`> 0` would drop it and leave the loss finite while
    its gradient is NaN), where the loss's finiteness check finds it. The where() is inside the product: where
    p_t == 0 the difference is -inf for a teacher logit of -inf (a top-k cache's rows), and the product's
    gradient w.r.t. p_t, that difference times 0, would be NaN."""
    p_t = log_pt.exp()
    return (p_t * torch.where(p_t != 0, log_pt - log_ps, 0.0)).sum(-1)


def _checked(loss: Tensor, teacher_logits: Tensor, keep: Tensor | None) -> Tensor:
    """`loss` when finite or when only the student is to blame; NonFiniteError when the teacher's kept rows hold
    NaN or inf (distill.finite.check_targets)."""
    if not finite(loss):
        check_targets(teacher_logits=_select(_rows(teacher_logits), keep))
    return loss


def _soft_rows(student_logits, teacher_logits, temperature, mask):
    """Shared front half of the two soft-target losses: validate, flatten, select, log-softmax."""
    _check_pair(student_logits, teacher_logits)
    T = _check_temperature(temperature)
    leading = student_logits.shape[:-1]
    keep = _flat_mask(mask, leading, student_logits.device)
    s = _select(_rows(student_logits), keep)
    t = _select(_rows(teacher_logits), keep)
    dtype = torch.promote_types(s.dtype, t.dtype)
    log_ps = torch.log_softmax(s.to(dtype) / T, dim=-1)
    log_pt = torch.log_softmax(t.to(dtype) / T, dim=-1)
    return T, leading, keep, log_ps, log_pt


def soft_target_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    t2_scaling: bool = True,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
) -> Tensor:
    """Temperature-scaled KL divergence from the teacher's to the student's distribution.

    Per row (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):

        p_t = softmax(t / T),  p_s = softmax(s / T)
        loss_row = T^2 * sum_c p_t,c * (log p_t,c - log p_s,c)

    The T^2 factor (only when ``t2_scaling``) keeps the gradient magnitude roughly
    independent of T, since d/ds of the unscaled KL shrinks like 1/T^2 for large T.
    Terms with p_t,c == 0 (teacher logit -inf) contribute 0.

    Shapes: logits are [..., C]; leading dims are flattened into rows. ``mask`` is an
    optional bool tensor of the leading shape; False rows are excluded from the loss and
    from the row count. ``reduction``: "batchmean" = sum over classes, mean over kept rows;
    "sum" = sum over everything; "none" = per-row loss of the leading shape (0 on masked rows).
    Half-precision inputs are computed in float32.
    """
    _check_reduction(reduction, _ROW_REDUCTIONS)
    T, leading, keep, log_ps, log_pt = _soft_rows(student_logits, teacher_logits, temperature, mask)
    per_row = _kl_rows(log_pt, log_ps)
    if t2_scaling:
        per_row = per_row * (T * T)
    return _checked(_reduce_rows(per_row, keep, leading.numel(), leading, reduction), teacher_logits, keep)


def soft_target_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    t2_scaling: bool = True,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
) -> Tensor:
    """Temperature-scaled cross-entropy of the student against the teacher's soft targets.

    Per row (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):

        p_t = softmax(t / T),  p_s = softmax(s / T)
        loss_row = -T^2 * sum_c p_t,c * log p_s,c

    This equals ``soft_target_kl`` plus T^2 * H(p_t), the teacher's entropy. That term is
    constant w.r.t. the student, so both losses give the same gradients; only the value
    differs (this one is not 0 when the student matches the teacher).
    T^2 only when ``t2_scaling``. ``mask`` and ``reduction`` work as in ``soft_target_kl``.
    """
    _check_reduction(reduction, _ROW_REDUCTIONS)
    T, leading, keep, log_ps, log_pt = _soft_rows(student_logits, teacher_logits, temperature, mask)
    p_t = log_pt.exp()
    per_row = -(p_t * torch.where(p_t != 0, log_ps, 0.0)).sum(-1)  # where() as in _kl_rows
    if t2_scaling:
        per_row = per_row * (T * T)
    return _checked(_reduce_rows(per_row, keep, leading.numel(), leading, reduction), teacher_logits, keep)
