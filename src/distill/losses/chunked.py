"""Token losses at large vocabularies: the divergence and the cross-entropy over rows, a chunk of rows at a time.

For rows n = 1..N of counted positions (logits s_n, t_n of V entries, labels y_n, −1 = unlabelled):

    total = Σ_n a_n · d_n + Σ_{n: y_n ≥ 0} b_n · ce_n
    d_n   = token_divergence(s_n, t_n, kind, T, β, α)        (distill.losses.divergence; T² included)
    ce_n  = −log softmax(s_n)_{y_n}                           (hard labels, at T = 1)
a_n (soft_weights), b_n (hard_weights): a number for every row, or one per row ([N]). Rows labelled −1 count in
the divergence only.

Three ways to the same value and gradients (equal to float rounding; tested at 1e-12 in float64):
  plain    (chunk_size None): the formulas on all rows at once under autograd; it holds several [N, V]
           temporaries (log-probabilities, probabilities, products) until the backward pass.
  chunked  from logits [N, V]: `chunk_size` rows at a time; besides the inputs and the [N, V] gradient it holds
           O(chunk_size × V).
  fused    from the final hidden states h [N, d] and the output projection (W [V, d], b [V]) of both models:
           the logits of one chunk, s = h_c·Wᵀ + b, exist only while that chunk is processed, so no [N, V] tensor
           of either model is ever built; the gradient goes to h, W and b of the student (the teacher is fixed:
           its inputs get no gradient).
Liger-Kernel's fused linear losses (FusedLinearCrossEntropy, FusedLinearJSD) and Apple's cut-cross-entropy are
built on the same idea. As in Liger, the gradient is computed chunk by chunk in the forward pass, while each
chunk's logits exist, and the backward pass only scales it by the incoming gradient: recomputing the chunks in
backward would run the output projections of both models a second time (1.5x the matrix products of the plain
path, whose backward needs only the student's). Consequence: the backward may run once per forward (a second
backward, e.g. with retain_graph, raises). A chunk's value and gradient come from closed-form formulas
(distill.losses.divergence_grad), computed in place in 4-5 [chunk_size, V] buffers; autograd would keep ~10.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import UserError
from distill.finite import check_targets, finite, require_finite
from distill.losses.divergence import check_divergence, check_divergence_inputs, token_divergence
from distill.losses.divergence_grad import cross_entropy_with_grad, divergence_with_grad
from distill.losses.hard import hard_label_loss

__all__ = [
    "LossSums", "chunked_loss_sums", "fused_loss_sums",
    "chunked_divergence_sum", "fused_divergence_sum", "chunked_cross_entropy_sum", "fused_cross_entropy_sum",
]


class LossSums(NamedTuple):
    total: Tensor  # Σ a_n·d_n + Σ b_n·ce_n, differentiable
    soft: Tensor  # Σ_n d_n, unweighted, detached (for logging)
    hard: Tensor  # Σ_{y_n ≥ 0} ce_n, unweighted, detached


class _Spec(NamedTuple):
    """What to compute for a chunk of rows: the formulas above with these arguments."""
    labels: Tensor | None
    kind: str
    options: dict
    soft_weights: Tensor | float
    hard_weights: Tensor | float


def _row_weights(weights, rows) -> tuple[Tensor | float, Tensor | float]:
    """(per-row weights, the same as a column for [rows, V] gradients)."""
    return (weights[rows], weights[rows][:, None]) if isinstance(weights, Tensor) else (weights, weights)


def _plain(spec: _Spec, s: Tensor, t: Tensor | None) -> LossSums:
    """All rows at once under autograd: the reference the chunked and fused paths equal."""
    total = soft = hard = s.new_zeros((), dtype=torch.float64 if s.dtype == torch.float64 else torch.float32)
    if t is not None:
        d = token_divergence(s, t, spec.kind, **spec.options)
        total, soft = total + (d * spec.soft_weights).sum(), d.sum()
    if spec.labels is not None:
        ce = hard_label_loss(s, spec.labels, pseudo_labels=False, reduction="none")  # 0 on rows labelled -1
        total, hard = total + (ce * spec.hard_weights).sum(), ce.sum()
    return LossSums(total, soft.detach(), hard.detach())


def _chunk(spec: _Spec, s: Tensor, t: Tensor | None, rows: slice, owned: bool):
    """(total, soft, hard, ∂total/∂s) of one chunk by the closed-form gradients. The cross-entropy reads s first:
    with owned=True the divergence then overwrites s and t (buffers of this chunk only)."""
    total = soft = hard = torch.zeros((), dtype=torch.float64 if s.dtype == torch.float64 else torch.float32,
                                      device=s.device)
    grad = None
    if spec.labels is not None:
        ce, grad = cross_entropy_with_grad(s, spec.labels[rows])
        row, column = _row_weights(spec.hard_weights, rows)
        total, hard, grad = (ce * row).sum(), ce.sum(), grad.mul_(column)
    if t is not None:
        d, g = divergence_with_grad(s, t, spec.kind, owned=owned, **spec.options)
        row, column = _row_weights(spec.soft_weights, rows)
        total, soft, g = total + (d * row).sum(), d.sum(), g.mul_(column)
        grad = g if grad is None else grad.add_(g)
    return total, soft, hard, grad


def _sweep(n: int, chunk_size: int, logits_of: Callable, spec: _Spec, send_grad: Callable | None, owned: bool):
    """(total, soft, hard) over all rows, `chunk_size` rows at a time; each chunk's gradient w.r.t. its student
    logits goes to send_grad(rows, g) while the chunk is in memory."""
    sums = []
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        s, t = logits_of(rows)
        *parts, g = _chunk(spec, s, t, rows, owned)
        if send_grad is not None:
            send_grad(rows, g)
        sums.append(parts)
    return tuple(sum(column) for column in zip(*sums)) if sums else tuple(torch.zeros(()) for _ in range(3))


def _hand_over(ctx, grad_output: Tensor) -> list:
    """The gradients computed in forward, scaled by the incoming gradient (in place: no second [N, V] buffer)."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError("chunked/fused token losses compute their gradients during the forward pass and can be "
                           "backpropagated once: run the forward again for a second backward")
    scale = None if bool(grad_output == 1) else grad_output
    return [g if g is None or scale is None else g.mul_(scale.to(g.dtype)) for g in grads]


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, spec, chunk_size, need_grad):
        grad = torch.empty_like(student_logits) if need_grad else None

        def send(rows, g):
            grad[rows] = g

        def logits_of(rows):
            return student_logits[rows], None if teacher_logits is None else teacher_logits[rows]

        total, soft, hard = _sweep(student_logits.shape[0], chunk_size, logits_of, spec, send if need_grad else None,
                                   owned=False)
        ctx.grads = [grad]
        ctx.mark_non_differentiable(soft, hard)
        return total.to(student_logits.device), soft, hard

    @staticmethod
    def backward(ctx, grad_total, _soft, _hard):
        return _hand_over(ctx, grad_total)[0], None, None, None, None


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, spec, chunk_size, need):
        # weight gradients of half-precision models accumulate over chunks in float32
        acc = torch.float32 if sw.dtype in (torch.float16, torch.bfloat16) else sw.dtype
        gh = torch.empty_like(sh) if need[0] else None
        gw = torch.zeros(sw.shape, dtype=acc, device=sw.device) if need[1] else None
        gb = torch.zeros(sb.shape, dtype=acc, device=sb.device) if need[2] else None

        def logits_of(rows):
            return F.linear(sh[rows], sw, sb), None if th is None else F.linear(th[rows], tw, tb)

        def send(rows, g):
            g = g.to(sw.dtype)
            if gh is not None:
                gh[rows] = g @ sw
            if gw is not None:
                gw.addmm_(g.t().to(acc), sh[rows].to(acc))
            if gb is not None:
                gb.add_(g.sum(0).to(acc))

        total, soft, hard = _sweep(sh.shape[0], chunk_size, logits_of, spec, send if any(need) else None, owned=True)
        ctx.grads = [gh, None if gw is None else gw.to(sw.dtype), None if gb is None else gb.to(sb.dtype)]
        ctx.mark_non_differentiable(soft, hard)
        return total.to(sh.device), soft, hard

    @staticmethod
    def backward(ctx, grad_total, _soft, _hard):
        gh, gw, gb = _hand_over(ctx, grad_total)
        return gh, gw, gb, None, None, None, None, None, None


def _needs_grad(x: Tensor | None) -> bool:
    return x is not None and torch.is_grad_enabled() and x.requires_grad


def _check_chunk(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise UserError(f"chunk_size must be a whole number of rows >= 1, got {chunk_size!r}")
    return chunk_size


def _check_weights(name: str, w, n: int) -> None:
    if isinstance(w, (int, float)) and not isinstance(w, bool):
        return
    if not (isinstance(w, Tensor) and w.is_floating_point() and w.shape == (n,)):
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise UserError(f"{name} must be a number or a float tensor of shape ({n},), one per row, got {got}")


def _check_labels(labels, n: int, vocab: int) -> None:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool or labels.shape != (n,):
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise UserError(f"labels must be an integer tensor of shape ({n},), one per row, got {got}")
    if n and not (-1 <= int(labels.min()) and int(labels.max()) < vocab):
        raise UserError(f"labels must be in [0, {vocab}) or -1 (unlabelled), got values from {int(labels.min())} "
                        f"to {int(labels.max())}")


def _spec(n: int, vocab: int, labels, kind, options, soft_weights, hard_weights, soft: bool) -> _Spec:
    """Validated arguments (UserError, one line) as a _Spec."""
    if soft:
        check_divergence(kind, **options)
        _check_weights("soft_weights", soft_weights, n)
    if labels is not None:
        _check_labels(labels, n, vocab)
        _check_weights("hard_weights", hard_weights, n)
    return _Spec(labels, kind, options, soft_weights, hard_weights)


def chunked_loss_sums(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None, *,
                      kind: str = "forward_kl", chunk_size: int | None, soft_weights=1.0, hard_weights=1.0,
                      **options) -> LossSums:
    """The module's total from logits [N, V] (teacher None: no divergence; labels None: no cross-entropy);
    chunk_size None = plain autograd. options: temperature, beta, alpha of token_divergence."""
    if not isinstance(student_logits, Tensor) or student_logits.dim() != 2:
        got = tuple(student_logits.shape) if isinstance(student_logits, Tensor) else type(student_logits).__name__
        raise UserError(f"student_logits must be [N, V] rows of counted positions, got {got}")
    n, vocab = student_logits.shape
    spec = _spec(n, vocab, labels, kind, options, soft_weights, hard_weights, teacher_logits is not None)
    if chunk_size is None:
        return _plain(spec, student_logits, teacher_logits)
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise UserError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
                        f"{tuple(student_logits.shape)}")
    sums = LossSums(*_Chunked.apply(student_logits, teacher_logits, spec, _check_chunk(chunk_size),
                                    _needs_grad(student_logits)))
    if not finite(sums.total) and teacher_logits is not None:  # divergence_grad's masks keep a teacher's NaN
        check_divergence_inputs(student_logits, teacher_logits, kind)
    return sums


def _check_projection(role: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if not (isinstance(hidden, Tensor) and isinstance(weight, Tensor) and hidden.dim() == 2 and weight.dim() == 2
            and hidden.shape[1] == weight.shape[1] and (bias is None or bias.shape == weight.shape[:1])):
        shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in (hidden, weight, bias)]
        raise UserError(f"{role} hidden [N, d], weight [V, d] and bias [V] or None do not fit, got shapes {shapes}")


def fused_loss_sums(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                    teacher_hidden: Tensor | None, teacher_weight: Tensor | None, teacher_bias: Tensor | None,
                    labels: Tensor | None, *, kind: str = "forward_kl", chunk_size: int, soft_weights=1.0,
                    hard_weights=1.0, **options) -> LossSums:
    """The module's total from hidden states and output projections, never building [N, V] logits; student
    logits = student_hidden·student_weightᵀ + student_bias, likewise the teacher's (teacher_hidden None: no
    divergence). Gradients reach the student's hidden states, weight and bias."""
    _check_projection("student", student_hidden, student_weight, student_bias)
    n = student_hidden.shape[0]
    if teacher_hidden is not None:
        _check_projection("teacher", teacher_hidden, teacher_weight, teacher_bias)
        if teacher_hidden.shape[0] != n or teacher_weight.shape[0] != student_weight.shape[0]:
            raise UserError(f"teacher ({teacher_hidden.shape[0]} rows, vocabulary {teacher_weight.shape[0]}) and student "
                            f"({n} rows, vocabulary {student_weight.shape[0]}) must have the same rows and vocabulary")
    spec = _spec(n, student_weight.shape[0], labels, kind, options, soft_weights, hard_weights, teacher_hidden is not None)
    need = (_needs_grad(student_hidden), _needs_grad(student_weight), _needs_grad(student_bias))
    sums = LossSums(*_Fused.apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                  teacher_bias, spec, _check_chunk(chunk_size), need))
    if not finite(sums.total) and teacher_hidden is not None:
        _check_fused_teacher(teacher_hidden, teacher_weight, teacher_bias, chunk_size)
    return sums


@torch.no_grad()
def _check_fused_teacher(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int) -> None:
    """After a non-finite fused loss: NonFiniteError when the teacher's side holds NaN or inf, its inputs or the
    logits they make (a half-precision teacher's may overflow), chunk by chunk as the loss built them."""
    check_targets(rows=False, teacher_hidden=hidden, teacher_weight=weight, teacher_bias=bias)
    for start in range(0, hidden.shape[0], chunk_size):
        require_finite(F.linear(hidden[start:start + chunk_size], weight, bias), "the teacher's logits (teacher_hidden "
                       f"times teacher_weight, in {weight.dtype})", "they overflow: run the teacher in float32", rows=True)


def chunked_divergence_sum(student_logits: Tensor, teacher_logits: Tensor, kind: str, *, chunk_size: int,
                           weights: Tensor | None = None, **options) -> Tensor:
    """Σ_n w_n·d_n from logits [N, V], chunk_size rows at a time (w = 1 when weights is None)."""
    return chunked_loss_sums(student_logits, teacher_logits, None, kind=kind, chunk_size=chunk_size,
                             soft_weights=1.0 if weights is None else weights, **options).total


def fused_divergence_sum(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                         teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Tensor | None, kind: str, *,
                         chunk_size: int, weights: Tensor | None = None, **options) -> Tensor:
    """Σ_n w_n·d_n from hidden states and output projections, without [N, V] logits."""
    return fused_loss_sums(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                           None, kind=kind, chunk_size=chunk_size, soft_weights=1.0 if weights is None else weights,
                           **options).total


def chunked_cross_entropy_sum(student_logits: Tensor, labels: Tensor, *, chunk_size: int,
                              weights: Tensor | None = None) -> Tensor:
    """Σ_{y_n ≥ 0} w_n·ce_n from logits [N, V], chunk_size rows at a time."""
    return chunked_loss_sums(student_logits, None, labels, chunk_size=chunk_size,
                             hard_weights=1.0 if weights is None else weights).total


def fused_cross_entropy_sum(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                            labels: Tensor, *, chunk_size: int, weights: Tensor | None = None) -> Tensor:
    """Σ_{y_n ≥ 0} w_n·ce_n from hidden states and the output projection, without [N, V] logits."""
    return fused_loss_sums(student_hidden, student_weight, student_bias, None, None, None, labels,
                           chunk_size=chunk_size, hard_weights=1.0 if weights is None else weights).total
