"""Top-k ("truncated softmax") distillation: the teacher's distribution kept only on its k most likely classes.

This is also exactly what a top-k logit cache stores for large (LLM) vocabularies: per row the teacher's
k largest logits and their class indices, optionally with the teacher's full log-normaliser.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from distill.errors import UserError
from distill.finite import check_targets, finite
from distill.losses.kl import (
    _ROW_REDUCTIONS,
    _check_logits,
    _check_pair,
    _check_reduction,
    _check_temperature,
    _flat_mask,
    _kl_rows,
    _reduce_rows,
    _rows,
    _select,
    _upcast,
)

__all__ = ["topk_kd_loss", "topk_kd_loss_from_indices", "REST_POLICIES"]

REST_POLICIES = ("renormalize", "bucket")


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise UserError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise UserError(f"k must be >= 1 (the number of teacher classes kept per row), got {k}")
    return int(k)


def _check_rest(rest) -> str:
    if rest not in REST_POLICIES:
        raise UserError(f"rest must be one of {', '.join(map(repr, REST_POLICIES))}, got {rest!r}")
    return rest


def _check_indices(indices, shape: torch.Size, num_classes: int) -> Tensor:
    if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        got = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
        raise UserError(f"teacher_topk_indices must be an integer tensor, got {got}; pass indices.long()")
    if indices.shape != shape:
        raise UserError(
            f"teacher_topk_indices shape {tuple(indices.shape)} must equal teacher_topk_logits shape {tuple(shape)}"
        )
    idx = indices.long()
    if idx.numel() and bool(((idx < 0) | (idx >= num_classes)).any()):
        raise UserError(f"teacher_topk_indices must be in [0, {num_classes}), got values in [{int(idx.min())}, {int(idx.max())}]")
    # A repeated class would count its probability twice and make the buckets sum to more than 1.
    ordered = idx.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise UserError("teacher_topk_indices repeats a class within a row; each row needs k distinct classes")
    return idx


def _check_logsumexp(lse, leading: torch.Size) -> Tensor:
    if lse is None:
        raise UserError(
            'rest="bucket" needs teacher_logsumexp, the teacher\'s logsumexp(t / T) over all classes per row, '
            'to know the mass outside the top k; pass it or use rest="renormalize"'
        )
    if not isinstance(lse, Tensor) or not lse.is_floating_point():
        got = lse.dtype if isinstance(lse, Tensor) else type(lse).__name__
        raise UserError(f"teacher_logsumexp must be a floating-point tensor, got {got}")
    if lse.shape != leading:
        raise UserError(f"teacher_logsumexp shape {tuple(lse.shape)} must equal the logits' leading shape {tuple(leading)}")
    return lse


def _bucket_log_probs(s: Tensor, t: Tensor, idx: Tensor, lse_t: Tensor) -> tuple[Tensor, Tensor]:
    """rest="bucket" with S leaving classes out (k < C): (log q_t, log q_s) over the k classes of S and the rest
    bucket; s and t already divided by T, lse_t = L_t as a column [N, 1] (see topk_kd_loss_from_indices)."""
    log_qt = t - lse_t
    log_ps = torch.log_softmax(s, dim=-1)
    log_qs = log_ps.gather(-1, idx)
    log_mass_s = torch.logsumexp(log_qt, dim=-1, keepdim=True)
    if log_mass_s.numel() and float(log_mass_s.detach().max()) > 1e-3 * max(1.0, float(lse_t.detach().abs().max())):
        raise UserError(
            "teacher_logsumexp is smaller than the logsumexp of the top-k logits / T (the top k would hold "
            "more than all the mass); it must be logsumexp(t / T) over all classes, at the same temperature"
        )
    rest_t = -torch.expm1(log_mass_s.clamp(max=0.0))
    # t / T - L_t rounds to the spacing of floats near L_t, so a rest below that is noise: compared with the
    # student's exact (maybe astronomically small) rest it would make a large, false KL term
    noise = 8 * torch.finfo(t.dtype).eps * lse_t.detach().abs().clamp_min(1.0)
    rest_t = torch.where(rest_t <= noise, 0.0, rest_t)  # (<=: a NaN stays, for the finiteness check)
    # double where: a rest of 0 is log 0 = -inf (a bucket of probability 0), and log's infinite slope there
    # times the zero gradient of that bucket would give a teacher that requires grad NaN gradients
    some = rest_t != 0
    log_rest_t = torch.where(some, torch.where(some, rest_t, 1.0).log(), float("-inf"))
    in_s = torch.zeros_like(log_ps, dtype=torch.bool).scatter(-1, idx, True)
    log_rest_s = torch.logsumexp(log_ps.masked_fill(in_s, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([log_qt, log_rest_t], dim=-1), torch.cat([log_qs, log_rest_s], dim=-1)


def topk_kd_loss_from_indices(
    student_logits: Tensor,
    teacher_topk_logits: Tensor,
    teacher_topk_indices: Tensor,
    *,
    temperature: float = 1.0,
    rest: str = "renormalize",
    t2_scaling: bool = True,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
    teacher_logsumexp: Tensor | None = None,
) -> Tensor:
    """KD against a teacher known only on a set S of k classes per row (e.g. a top-k logit cache).

    Per row, with S = ``teacher_topk_indices`` (k distinct classes), t_S = ``teacher_topk_logits``,
    L_t = ``teacher_logsumexp`` = logsumexp_c(t_c / T) over ALL classes, p_s = softmax(s / T):

      rest="renormalize" (no mass outside S):
        q_t = softmax(t_S / T),  q_s = softmax(s_S / T)           (both over the k classes of S)
      rest="bucket" (the mass outside S becomes one extra class; needs L_t):
        q_t = [exp(t_S / T - L_t),  1 - sum_S exp(t_S / T - L_t)]
        q_s = [p_s,S,               sum_{c not in S} p_s,c]          (k + 1 buckets)
      loss_row = T^2 * sum_b q_t,b * (log q_t,b - log q_s,b)

    The student's rest bucket is logsumexp over its non-S log-probabilities, not log(1 - sum_S p_s),
    which would round to log 0 = -inf once the student puts almost all its mass on S. The teacher's
    rest is log(-expm1(logsumexp_S(t_S / T - L_t))), taken as mass 0 when it is below the rounding of
    t_S / T - L_t (8 eps |L_t|: the rest is then unknown; noise against the student's exact rest
    would make a large, false KL term). When S holds
    every class (k == C) the rest bucket is empty and left out, so both policies equal
    ``soft_target_kl``. Buckets with q_t == 0 contribute 0. T^2 only when ``t2_scaling``.

    Shapes: ``student_logits`` [..., C]; ``teacher_topk_logits`` and ``teacher_topk_indices`` [..., k]
    (raw logits, not divided by T); ``teacher_logsumexp`` of the leading shape [...]. ``mask`` and
    ``reduction`` work as in ``soft_target_kl``.
    """
    _check_reduction(reduction, _ROW_REDUCTIONS)
    T = _check_temperature(temperature)
    rest = _check_rest(rest)
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_topk_logits", teacher_topk_logits)
    leading, C = student_logits.shape[:-1], student_logits.shape[-1]
    k = teacher_topk_logits.shape[-1]
    if teacher_topk_logits.shape[:-1] != leading:
        raise UserError(
            f"teacher_topk_logits shape {tuple(teacher_topk_logits.shape)} must have the leading shape "
            f"{tuple(leading)} of student_logits {tuple(student_logits.shape)}"
        )
    if k > C:
        raise UserError(f"k = {k} teacher top-k columns but student_logits has only {C} classes")
    idx = _check_indices(teacher_topk_indices, teacher_topk_logits.shape, C)
    lse = _check_logsumexp(teacher_logsumexp, leading) if rest == "bucket" else None

    keep = _flat_mask(mask, leading, student_logits.device)
    s = _select(_rows(student_logits), keep)
    t = _select(_rows(teacher_topk_logits), keep)
    idx = _select(idx.reshape(-1, k).to(s.device), keep)
    dtype = torch.promote_types(s.dtype, t.dtype)
    s, t = s.to(dtype) / T, t.to(dtype) / T

    if rest == "renormalize" or k == C:  # k == C: no rest bucket, and L_t is not needed to normalise
        log_qt = torch.log_softmax(t, dim=-1)
        log_qs = torch.log_softmax(s.gather(-1, idx), dim=-1)
    else:
        lse_t = _select(_upcast(lse).reshape(-1, 1).to(s.device), keep).to(dtype)
        log_qt, log_qs = _bucket_log_probs(s, t, idx, lse_t)

    per_row = _kl_rows(log_qt, log_qs)
    if t2_scaling:
        per_row = per_row * (T * T)
    loss = _reduce_rows(per_row, keep, leading.numel(), leading, reduction)
    if not finite(loss):
        check_targets(teacher_topk_logits=_select(_rows(teacher_topk_logits), keep),
                      teacher_logsumexp=None if lse is None else _select(lse.reshape(-1, 1), keep))
    return loss


def topk_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    rest: str = "renormalize",
    t2_scaling: bool = True,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
) -> Tensor:
    """KD on the teacher's top-k classes per row (truncated softmax), from full teacher logits.

    S = the k classes with the largest teacher logits (all C classes when k >= C), then exactly
    ``topk_kd_loss_from_indices`` with L_t = logsumexp_c(t_c / T) for rest="bucket" (computed as the
    teacher's rows shifted by T·L_t, so that t_S / T - L_t is log_softmax(t / T) to the last bit):

      renormalize: T^2 * KL(softmax(t_S / T) || softmax(s_S / T))
      bucket:      T^2 * KL([p_t,S, 1 - sum_S p_t] || [p_s,S, 1 - sum_S p_s]),  p = softmax(logits / T)

    Shapes [..., C]; ``mask`` and ``reduction`` as in ``soft_target_kl``. k < 1 is refused.
    """
    k = _check_k(k)
    _check_pair(student_logits, teacher_logits)
    T = _check_temperature(temperature)
    leading, C = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    keep = _flat_mask(mask, leading, teacher_logits.device)
    t = _upcast(teacher_logits)
    if keep is not None:
        # Padding rows may hold garbage such as all -inf; zero them so the logsumexp below cannot
        # send NaN gradients back (they are dropped from the loss anyway).
        t = torch.where(keep.reshape(leading).unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))
    lse = None
    if rest == "bucket":
        # each row shifted by T·logsumexp(t / T), which changes no probability, so that L_t = 0 exactly:
        # t_S / T - L_t is then the teacher's log-probabilities as log_softmax computes them (shifting by the row's
        # maximum first), not a difference of two numbers of the size of L_t (in float32, 0.06 apart near 1e6)
        t = T * torch.log_softmax(t / T, dim=-1)
        lse = torch.zeros(leading, dtype=t.dtype, device=t.device)
    values, indices = t.topk(min(k, C), dim=-1)
    return topk_kd_loss_from_indices(
        student_logits, values, indices, temperature=T, rest=rest, t2_scaling=t2_scaling,
        reduction=reduction, mask=mask, teacher_logsumexp=lse,
    )
