"""Mean-squared error between raw student and teacher logits.

Hinton et al. (2015) show that matching logits is the high-temperature limit of the
soft-target KL; NLP Architect's TeacherStudentDistill offers it directly as nn.MSELoss.
"""

from __future__ import annotations

from torch import Tensor

from distill.finite import check_targets, finite
from distill.losses.kl import _check_pair, _check_reduction, _flat_mask, _reduce_rows, _rows, _select

__all__ = ["logit_mse"]


def logit_mse(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """Squared error between raw logits (no softmax, no temperature).

        loss_row = sum_c (s_c - t_c)^2

    ``reduction``: "mean" = sum of all squared errors / (kept rows * C), i.e. what
    nn.MSELoss does (NLP Architect TeacherStudentDistill's choice); "batchmean" = sum over
    classes, mean over kept rows; "sum" = sum over everything; "none" = per-row loss of the
    leading shape (0 on masked rows). ``mask`` is an optional bool tensor of the leading
    shape; False rows are excluded. Hinton, Vinyals & Dean (2015) derive this as the
    high-temperature limit of the soft-target loss.
    """
    _check_reduction(reduction, ("mean", "batchmean", "sum", "none"))
    _check_pair(student_logits, teacher_logits)
    leading = student_logits.shape[:-1]
    keep = _flat_mask(mask, leading, student_logits.device)
    s = _select(_rows(student_logits), keep)
    t = _select(_rows(teacher_logits), keep)
    per_row = (s - t).pow(2).sum(-1)
    if reduction == "mean":
        # Divide by elements, not rows; max() keeps an all-masked batch at 0 instead of nan.
        loss = per_row.sum() / max(s.numel(), 1)
    else:
        loss = _reduce_rows(per_row, keep, leading.numel(), leading, reduction)
    if not finite(loss):
        check_targets(teacher_logits=t, rows=False)  # raw logits: a -inf target is no probability 0 here
    return loss
