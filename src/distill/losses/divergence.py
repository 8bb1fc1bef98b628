"""Per-token divergences between a teacher's and a student's next-token distributions (LLM distillation).

Rows are the positions that count (the seam: a model returns logits [N, V] of exactly those positions, so
padding and prompt tokens never reach these functions). With p_T = softmax(t / T), p_S = softmax(s / T):

    forward_kl   KL(p_T ‖ p_S)                                  Hinton et al. 2015 (mean-seeking)
    reverse_kl   KL(p_S ‖ p_T)                                  MiniLLM, Gu et al. 2024 (mode-seeking)
    jsd          β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M),            generalised JSD of GKD, Agarwal et al. 2024, Eq. 1
                 M = β·p_T + (1−β)·p_S,  0 < β < 1
    skew_kl      KL(p_T ‖ α·p_T + (1−α)·p_S)                    DistiLLM, Ko et al. 2024 (skew KL)
    skew_rkl     KL(p_S ‖ α·p_S + (1−α)·p_T)                    DistiLLM (skew reverse KL)
    tv           ½·Σ_v |p_T,v − p_S,v|                          total variation
    KL(p ‖ q) = Σ_v p_v·(log p_v − log q_v), with 0·log 0 = 0

Every value is multiplied by T² (Hinton's scaling: the gradients of a divergence of softened distributions
shrink as 1/T², T² keeps them of one size across temperatures).

β follows TRL's `GKDTrainer.generalized_jsd_loss` exactly for 0 < β < 1 (β weighs the teacher in M and
KL(p_T ‖ M)). TRL also accepts β = 0 and β = 1 and then returns KL(p_T ‖ p_S) and KL(p_S ‖ p_T), but the formula
itself tends to 0 at both ends (JSD(β) ≈ β·KL(p_T ‖ p_S) as β → 0 and ≈ (1−β)·KL(p_S ‖ p_T) as β → 1), so
TRL's loss jumps there. Here β must lie strictly inside (0, 1); the end points are the kinds forward_kl and
reverse_kl, and jsd / β → forward_kl, jsd / (1−β) → reverse_kl are tested as limits.

Numerics: everything is in log space (log_softmax; the mixtures by log-add-exp, log(a·p + (1−a)·q) =
logaddexp(log a + log p, log(1−a) + log q)), so probabilities that underflow to 0 never meet a log(0); values
and gradients are finite for any finite logits (±1e4 included). Computed in float32, or float64 when given.
Teacher logits with NaN or inf (other than -inf classes in a row that has a finite one) raise NonFiniteError.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.errors import NonFiniteError, UserError
from distill.finite import check_targets, finite
from distill.losses.kl import _check_pair, _check_temperature, _kl_rows as _kl  # Σ p·(log p − log q), 0·log 0 = 0

__all__ = ["KINDS", "check_divergence", "check_divergence_inputs", "token_divergence"]

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tv")


def check_divergence(kind: str, temperature=1.0, beta=0.5, alpha=0.1) -> float:
    """Refuse (UserError, one line) an unknown kind or a β / α / T outside its range; returns T as a float."""
    if kind not in KINDS:
        raise UserError(f"divergence must be one of {', '.join(KINDS)}, got {kind!r}")
    T = _check_temperature(temperature)
    if kind == "jsd" and not (isinstance(beta, (int, float)) and 0 < beta < 1):
        raise UserError(f"jsd needs 0 < beta < 1, got {beta!r}: for beta 0 or 1 use divergence forward_kl or reverse_kl")
    if kind.startswith("skew") and not (isinstance(alpha, (int, float)) and 0 <= alpha < 1):
        raise UserError(f"{kind} needs 0 <= alpha < 1 (alpha = 1 makes it identically 0), got {alpha!r}")
    return T


def _log_mix(log_p: Tensor, log_q: Tensor, a: float) -> Tensor:
    """log(a·p + (1−a)·q) without leaving log space; a = 0 is q itself (log 0 = −inf would reach the graph)."""
    if a == 0:
        return log_q
    return torch.logaddexp(log_p + math.log(a), log_q + math.log1p(-a))


def _per_row(kind: str, log_pt: Tensor, log_ps: Tensor, beta: float, alpha: float) -> Tensor:
    if kind == "forward_kl":
        return _kl(log_pt, log_ps)
    if kind == "reverse_kl":
        return _kl(log_ps, log_pt)
    if kind == "jsd":
        log_m = _log_mix(log_pt, log_ps, beta)
        return beta * _kl(log_pt, log_m) + (1 - beta) * _kl(log_ps, log_m)
    if kind == "skew_kl":
        return _kl(log_pt, _log_mix(log_pt, log_ps, alpha))
    if kind == "skew_rkl":
        return _kl(log_ps, _log_mix(log_ps, log_pt, alpha))
    return 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1)  # tv


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """T² · D(p_T, p_S) per row for logits [N, V] of the counted positions (D: `kind`, see the module docstring).

    Returns [N], no reduction, in float32 (float64 if either input is float64). Gradients flow to both inputs;
    the teacher's are usually unused (its logits come without a graph).
    """
    T = check_divergence(kind, temperature, beta, alpha)
    _check_pair(student_logits, teacher_logits)
    if student_logits.dim() != 2:
        raise UserError(f"logits must be [N, V] rows of counted positions, got shape {tuple(student_logits.shape)}: "
                        "select the counted positions first (e.g. logits[mask])")
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    log_ps = torch.log_softmax(student_logits.to(dtype) / T, dim=-1)
    log_pt = torch.log_softmax(teacher_logits.to(dtype) / T, dim=-1)
    d = _per_row(kind, log_pt, log_ps, float(beta), float(alpha)) * (T * T)
    if not finite(d):
        check_divergence_inputs(student_logits, teacher_logits, kind)
    return d


def check_divergence_inputs(student_logits: Tensor, teacher_logits: Tensor, kind: str) -> None:
    """After a non-finite divergence: NonFiniteError when the teacher is to blame, by NaN or inf
    (distill.finite.check_targets), or by -inf classes (probability 0, as a top-k cache gives them) where the
    student has mass, which makes the reverse KL infinite."""
    check_targets(teacher_logits=teacher_logits)
    if finite(student_logits) and not finite(teacher_logits):
        raise NonFiniteError(f"teacher_logits hold -inf (classes of probability 0, as from a top-k teacher cache), "
                             f"where the divergence {kind} is infinite: use forward_kl, jsd, skew_kl, tv or skew_rkl "
                             "with alpha > 0, or the teacher's full logits")
