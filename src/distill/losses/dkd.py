"""Decoupled Knowledge Distillation loss (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, "Decoupled Knowledge
Distillation"; reference code: megvii-research/mdistiller, mdistiller/distillers/DKD.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from distill.errors import UserError
from distill.losses.kd import _check_weight
from distill.losses.kl import _check_pair, _check_temperature, _checked, _kl_rows, _rows

__all__ = ["dkd_loss"]


def _target_split(log_p: Tensor, target: Tensor) -> Tensor:
    """[N, C] log-probabilities -> [N, 2] log of b = [p_target, 1 - p_target].

    log(1 - p_target) is a logsumexp over the non-target classes rather than log1p(-p_target), so a
    confident softmax (p_target -> 1 in floating point) still gives a finite log of the rest.
    """
    log_gt = log_p.gather(-1, target[:, None])
    log_rest = log_p.scatter(-1, target[:, None], float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([log_gt, log_rest], dim=-1)


def _non_target(x: Tensor, target: Tensor) -> Tensor:
    """[N, C] -> [N, C-1]: each row without its target column."""
    keep = torch.ones_like(x, dtype=torch.bool).scatter(-1, target[:, None], False)
    return x[keep].reshape(x.shape[0], x.shape[1] - 1)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled KD: the classic KD loss split into a target-class and a non-target-class part.

    Per row, with target class g, p = softmax(z / T) for the teacher (t) and the student (s):

        b = [p_g, 1 - p_g]                                  (binary: target vs the rest)
        q = softmax(z_{-g} / T)                             (the C-1 non-target classes, renormalised)
        TCKD = T² · KL(b^t || b^s)
        NCKD = T² · KL(q^t || q^s)
        loss = alpha · TCKD + beta · NCKD

    Each KL is summed over its classes and averaged over the rows (mdistiller divides the summed
    ``F.kl_div`` by the batch size). The paper's identity, without T²:
    KL(p^t || p^s) = TCKD + (1 - p^t_g) · NCKD, so plain KD ties NCKD's weight to the teacher's
    confidence; DKD frees it as ``beta``.

    mdistiller gets q by subtracting 1000 from the scaled target logit before a softmax over all
    classes; here the target column is dropped, which is the exact limit of that trick (equal in
    floating point unless z_g / T exceeds the other scaled logits by about 1000, where the trick no
    longer masks the target). The binary part is computed in log space for the same reason.

    ``labels``: integer tensor of the leading shape, values in [0, C). Rows labelled -1 (unlabelled)
    take the teacher's argmax as their target class g; they still count in the row mean.
    Logits are [..., C] with C >= 2; leading dims are flattened into rows. Half precision is computed
    in float32. Returns ``(loss, {"tckd": TCKD, "nckd": NCKD})``, the parts unweighted and detached.
    """
    T = _check_temperature(temperature)
    a = _check_weight("alpha", alpha)
    b = _check_weight("beta", beta)
    _check_pair(student_logits, teacher_logits)
    leading, C = student_logits.shape[:-1], student_logits.shape[-1]
    if C < 2:
        raise UserError(f"dkd_loss needs at least 2 classes (a target and a non-target part), got {C}")
    if labels is None:
        raise UserError("dkd_loss needs labels (the target class of each row); use -1 for unlabelled rows")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise UserError(f"labels must be an integer tensor, got {got}; pass labels.long()")
    if labels.shape != leading:
        raise UserError(f"labels shape {tuple(labels.shape)} must equal the logits' leading shape {tuple(leading)}")

    s, t = _rows(student_logits), _rows(teacher_logits)
    dtype = torch.promote_types(s.dtype, t.dtype)
    s, t = s.to(dtype) / T, t.to(dtype) / T
    y = labels.reshape(-1).to(s.device).long()
    bad = (y != -1) & ((y < 0) | (y >= C))
    if bool(bad.any()):
        raise UserError(f"labels must be in [0, {C}) or -1 (unlabelled), got label {int(y[bad][0])} with {C} classes")
    # Unlabelled rows: the teacher's top class is the best guess of the target (no gradient flows through it).
    g = torch.where(y == -1, t.detach().argmax(-1), y)

    n = max(s.shape[0], 1)
    tckd = _kl_rows(_target_split(t.log_softmax(-1), g), _target_split(s.log_softmax(-1), g)).sum() * (T * T) / n
    nckd = _kl_rows(_non_target(t, g).log_softmax(-1), _non_target(s, g).log_softmax(-1)).sum() * (T * T) / n
    loss = _checked(a * tckd + b * nckd, teacher_logits, None)
    return loss, {"tckd": tckd.detach(), "nckd": nckd.detach()}
