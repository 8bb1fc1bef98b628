"""The combined distillation loss: weighted hard-label loss plus a soft (teacher-matching) term."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.errors import UserError
from distill.losses.hard import hard_label_loss
from distill.losses.kl import _check_pair, _check_temperature, _flat_mask, soft_target_cross_entropy, soft_target_kl
from distill.losses.mse import logit_mse

__all__ = ["kd_loss", "SOFT_LOSSES"]

SOFT_LOSSES = ("kl", "soft_ce", "mse")


def _check_weight(name: str, value) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number >= 0, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(w) or w < 0:
        raise UserError(f"{name} must be a finite number >= 0, got {value!r}")
    return w


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    soft: str = "kl",
    t2_scaling: bool = True,
    pseudo_labels: bool = True,
    ignore_index: int = -1,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hinton-style distillation loss, as combined in NLP Architect's TeacherStudentDistill.

        total = hard_weight * HARD + soft_weight * SOFT

        HARD = hard_label_loss(s, labels, t, pseudo_labels, ignore_index)   (mean over rows)
        SOFT = soft_target_kl(s, t, T, t2_scaling)               if soft == "kl"      (batchmean)
             = soft_target_cross_entropy(s, t, T, t2_scaling)    if soft == "soft_ce" (batchmean)
             = logit_mse(s, t)                                   if soft == "mse"     (mean)

    Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", for the
    T^2-scaled soft term; NLP Architect TeacherStudentDistill for the weighted sum, the MSE
    option and pseudo-labels. With soft == "mse" the temperature and T^2 scaling do not
    apply (raw logits are compared), though the temperature is still validated.

    HARD is skipped (reported as 0) when ``labels`` is None or ``hard_weight`` == 0.
    ``mask`` (bool, leading shape) drops padding rows from both terms; dropping them from
    HARD matters because padding usually carries ignore_index and would otherwise be
    pseudo-labelled by the teacher.

    Returns ``(total, {"hard": HARD, "soft": SOFT})``; the dict values are unweighted and
    detached, for logging.
    """
    T = _check_temperature(temperature)
    hw = _check_weight("hard_weight", hard_weight)
    sw = _check_weight("soft_weight", soft_weight)
    if hw == 0 and sw == 0:
        raise UserError("hard_weight and soft_weight are both 0; set at least one of them > 0")
    if soft not in SOFT_LOSSES:
        raise UserError(f"soft must be one of {', '.join(map(repr, SOFT_LOSSES))}, got {soft!r}")
    _check_pair(student_logits, teacher_logits)
    use_hard = labels is not None and hw > 0
    if not use_hard and sw == 0:
        raise UserError("labels is None and soft_weight is 0, so the loss is empty; pass labels or set soft_weight > 0")

    if soft == "mse":
        soft_term = logit_mse(student_logits, teacher_logits, reduction="mean", mask=mask)
    else:
        fn = soft_target_kl if soft == "kl" else soft_target_cross_entropy
        soft_term = fn(student_logits, teacher_logits, T, t2_scaling=t2_scaling, reduction="batchmean", mask=mask)

    if use_hard:
        s, t, y = student_logits, teacher_logits, labels
        keep = _flat_mask(mask, student_logits.shape[:-1], student_logits.device)
        if keep is not None:
            C = student_logits.shape[-1]
            s, t = s.reshape(-1, C)[keep], t.reshape(-1, C)[keep]
            if isinstance(y, Tensor) and y.shape == student_logits.shape[:-1]:
                y = y.reshape(-1).to(keep.device)[keep]
            # else: leave y as is so hard_label_loss reports the shape mismatch
        hard_term = hard_label_loss(s, y, t, pseudo_labels=pseudo_labels, ignore_index=ignore_index, reduction="mean")
    else:
        hard_term = torch.zeros((), dtype=soft_term.dtype, device=soft_term.device)

    # Skip a zero-weighted term instead of multiplying by 0, so an inf/nan in it can't poison the total.
    total = (hw * hard_term if use_hard else 0) + (sw * soft_term if sw > 0 else 0)
    return total, {"hard": hard_term.detach(), "soft": soft_term.detach()}
