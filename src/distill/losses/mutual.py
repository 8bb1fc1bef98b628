"""Deep mutual learning loss (Zhang, Xiang, Hospedales & Lu, CVPR 2018, "Deep Mutual Learning")."""

from __future__ import annotations

import torch
from torch import Tensor

from distill.errors import UserError
from distill.finite import require_finite
from distill.losses.hard import hard_label_loss
from distill.losses.kd import _check_weight
from distill.losses.kl import _check_pair, _check_temperature, soft_target_kl

__all__ = ["mutual_loss"]


def mutual_loss(
    logits: list[Tensor] | tuple[Tensor, ...],
    labels: Tensor | None,
    *,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    teacher_logits: Tensor | None = None,
    teacher_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum over K >= 2 students of their deep-mutual-learning losses.

    With z_1..z_K the students' logits, t the teacher's, p_j = softmax(z_j / T):

        L_k   = CE(z_k, y)
              + kl_weight / (K-1) · Σ_{j≠k} T² · KL(sg(p_j) || p_k)
              + teacher_weight · T² · KL(softmax(t/T) || p_k)          (only when teacher_logits is given)
        total = Σ_k L_k

    sg = stop-gradient: the peers' distributions are fixed targets for student k, so d total / d z_k
    = d L_k / d z_k and one backward of the sum trains every student on its own DML loss.
    The paper uses T = 1; the T² factor (Hinton et al. 2015) only keeps gradient sizes comparable when T ≠ 1.
    CE skips unlabelled rows (label -1); the KL terms use every row. ``labels=None`` drops CE.

    Logits of a student with NaN or inf (other than -inf classes), or such teacher logits, raise NonFiniteError.
    Returns ``(total, parts)`` with parts averaged over the K students (unweighted, detached):
    ``ce``, ``kl`` (the 1/(K-1)-averaged peer KL) and ``teacher`` (only when teacher_logits is given).
    """
    if not isinstance(logits, (list, tuple)) or len(logits) < 2:
        raise UserError(f"logits must be a list of at least 2 students' logits, got {type(logits).__name__} "
                        f"of length {len(logits) if isinstance(logits, (list, tuple)) else '-'}")
    for z in logits[1:]:
        _check_pair(logits[0], z)
    T = _check_temperature(temperature)
    kw = _check_weight("kl_weight", kl_weight)
    tw = _check_weight("teacher_weight", teacher_weight)
    if teacher_logits is not None:
        _check_pair(logits[0], teacher_logits)
        teacher_logits = teacher_logits.detach()

    K = len(logits)
    for k, z in enumerate(logits):  # each is a target of the others: soft_target_kl would blame the "teacher"
        require_finite(z, f"logits[{k}] (of student {k}; 0 is the trained one)", "the students diverged: lower the "
                       "learning rate or clip gradients", rows=True)
    targets = [z.detach() for z in logits]
    total = 0
    ce_sum, kl_sum, teacher_sum = 0.0, 0.0, 0.0
    for k, z in enumerate(logits):
        kl = sum(soft_target_kl(z, targets[j], T) for j in range(K) if j != k) / (K - 1)
        loss_k = kw * kl
        kl_sum = kl_sum + kl.detach()
        if labels is not None:
            ce = hard_label_loss(z, labels, pseudo_labels=False)
            loss_k = loss_k + ce
            ce_sum = ce_sum + ce.detach()
        if teacher_logits is not None:
            tkl = soft_target_kl(z, teacher_logits, T)
            loss_k = loss_k + tw * tkl
            teacher_sum = teacher_sum + tkl.detach()
        total = total + loss_k

    parts = {"ce": torch.as_tensor(ce_sum / K), "kl": kl_sum / K}
    if teacher_logits is not None:
        parts["teacher"] = teacher_sum / K
    return total, parts
