"""Cross-entropy to hard labels, with teacher pseudo-labels for unlabelled rows.

Follows NLP Architect's TeacherStudentDistill: labelled rows use their gold label,
unlabelled rows (label == ignore_index) use the teacher's argmax as the target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.errors import UserError
from distill.finite import check_targets
from distill.losses.kl import _check_logits, _check_pair, _check_reduction, _reduce_rows, _rows

__all__ = ["hard_label_loss"]


def hard_label_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    pseudo_labels: bool = True,
    ignore_index: int = -1,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the student to hard labels, optionally pseudo-labelling by the teacher.

    Per row (NLP Architect TeacherStudentDistill; Hinton, Vinyals & Dean 2015 for the
    hard-label term of distillation):

        loss_row = -log softmax(s)_y                    if y != ignore_index
        loss_row = -log softmax(s)_{argmax_c t_c}       if y == ignore_index, pseudo_labels
                                                        and teacher_logits is given
        (row left out)                                  otherwise

    Shapes: ``student_logits`` [..., C]; ``labels`` integer tensor of the leading shape;
    ``teacher_logits`` (optional) the same shape as ``student_logits``.
    ``reduction``: "mean" over the rows that count; "sum"; "none" = per-row loss of the
    leading shape, 0 for rows left out. When no row counts the result is a 0 that is still
    connected to ``student_logits``, so ``backward()`` works.
    """
    _check_reduction(reduction, ("mean", "sum", "none"))
    _check_logits("student_logits", student_logits)
    leading, num_classes = student_logits.shape[:-1], student_logits.shape[-1]
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise UserError(f"labels must be an integer tensor, got {got}; pass labels.long()")
    if labels.shape != leading:
        raise UserError(
            f"labels shape {tuple(labels.shape)} must equal student_logits' leading shape {tuple(leading)}"
        )
    if teacher_logits is not None:
        _check_pair(student_logits, teacher_logits)

    y = labels.reshape(-1).to(student_logits.device).long()
    if y.numel() and not 0 <= ignore_index < num_classes:
        low, high = (int(v) for v in y.aminmax())
        if low >= 0 and high < num_classes:  # the common case, every row labelled: one check instead of a dozen ops
            per_row = torch.nn.functional.cross_entropy(_rows(student_logits), y, reduction="none")
            return _reduce_rows(per_row, None, leading.numel(), leading, reduction)
    unlabelled = y == ignore_index
    bad = ~unlabelled & ((y < 0) | (y >= num_classes))
    if bool(bad.any()):
        raise UserError(
            f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}, "
            f"got label {int(y[bad][0])} with {num_classes} classes"
        )

    target = y.clone()
    counts = ~unlabelled
    if pseudo_labels and teacher_logits is not None:
        # The teacher is a fixed target: its argmax carries no gradient. The row maxima come with it: NaN or +inf
        # in a row (argmax would pick it as the label, silently) makes them non-finite.
        top, teacher_argmax = teacher_logits.detach().reshape(-1, num_classes).max(-1)
        if not bool(torch.isfinite(top[unlabelled]).all()):
            check_targets(teacher_logits=teacher_logits.detach().reshape(-1, num_classes)[unlabelled])
        target = torch.where(unlabelled, teacher_argmax, target)
        counts = torch.ones_like(counts)

    if bool(counts.all()):  # no row to drop (all pseudo-labelled or labelled): skip the (copying) boolean selection
        per_row = torch.nn.functional.cross_entropy(_rows(student_logits), target, reduction="none")
        return _reduce_rows(per_row, None, leading.numel(), leading, reduction)
    log_ps = torch.log_softmax(_rows(student_logits)[counts], dim=-1)
    per_row = -log_ps.gather(-1, target[counts].unsqueeze(-1)).squeeze(-1)
    return _reduce_rows(per_row, counts, leading.numel(), leading, reduction)
