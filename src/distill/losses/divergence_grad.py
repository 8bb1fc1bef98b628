"""The per-token divergences and the hard-label cross-entropy together with their closed-form gradients.

The chunked and fused evaluations (distill.losses.chunked) need, for each chunk of rows, the values and the
gradient w.r.t. the student logits while the chunk is in memory. Autograd would keep every intermediate of the
chunk (~10 [chunk, V] buffers); these formulas need 4-5, updated in place, and fewer passes over memory.
Tested against autograd of distill.losses.divergence.token_divergence (tests/test_divergences.py).

With z = s / T, ls = log p_S = log_softmax(z), lt = log p_T, d = T²·D and ∂d/∂s = T·∂D/∂z. For a function of
ls, ∂D/∂z_k = g_k − p_S,k·Σ_j g_j with g = ∂D/∂ls (the log-softmax Jacobian). Per kind (M, K as named):

    forward_kl  ∂D/∂z = p_S − p_T
    reverse_kl  ∂D/∂z_k = p_S,k·(ls_k − lt_k − D)
    jsd         M = β·p_T + (1−β)·p_S, K_S = KL(p_S ‖ M):   ∂D/∂z_k = (1−β)·p_S,k·(ls_k − lm_k − K_S)
    skew_kl     M = α·p_T + (1−α)·p_S, r_k = p_T,k·p_S,k / M_k:   ∂D/∂z_k = (1−α)·(p_S,k·Σ_j r_j − r_k)
    skew_rkl    M = α·p_S + (1−α)·p_T, q_k = p_S,k² / M_k:
                ∂D/∂z_k = p_S,k·(ls_k − lm_k − D − α·(p_S,k / M_k − Σ_j q_j))
    tv          σ_k = sign(p_T,k − p_S,k):   ∂D/∂z_k = −½·p_S,k·(σ_k − Σ_j p_S,j·σ_j)
    cross-entropy to label y (T = 1):   ce = logsumexp(s) − s_y,   ∂ce/∂s = softmax(s) − onehot(y)

Entries with a probability of exactly 0 (a logit of −inf) contribute 0 to values and gradients, as 0·log 0 = 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["divergence_with_grad", "cross_entropy_with_grad"]


def _log_probs(x: Tensor, T: float, dtype: torch.dtype, owned: bool) -> Tensor:
    """log_softmax(x / T) in dtype, in x's own memory when the caller hands it over (owned) and no cast is needed."""
    z = (x.div_(T) if T != 1 else x) if owned and x.dtype == dtype else x.to(dtype) / T
    # shift by the row's maximum first (exact), as log_softmax does: z − logsumexp(z) would round
    # max + log Σ exp(z − max) to the spacing of floats near max (0.016 at 2e5 in float32)
    top = z.amax(-1, keepdim=True)
    z.sub_(torch.where(torch.isfinite(top), top, 0.0))
    return z.sub_(torch.logsumexp(z, -1, keepdim=True))


def _dot(p: Tensor, x: Tensor) -> Tensor:
    """Σ_v p_v·x_v per row, with 0 where p_v = 0 (x_v may be ±inf there)."""
    return torch.where(p > 0, x, 0.0).mul_(p).sum(-1)


def _dot_(p: Tensor, x: Tensor) -> Tensor:
    """_dot in x's memory (x is overwritten)."""
    return x.masked_fill_(p == 0, 0.0).mul_(p).sum(-1)


def _log_mix_into(log_p: Tensor, log_q: Tensor, a: float, out: Tensor) -> Tensor:
    """out := log(a·p + (1−a)·q), 0 < a < 1."""
    torch.add(log_p, math.log(a), out=out)
    return torch.logaddexp(out, log_q + math.log1p(-a), out=out)


def _forward_kl(ls, lt):
    pt = lt.exp()
    d = _dot_(pt, lt.sub_(ls))
    return d, ls.exp_().sub_(pt)


def _reverse_kl(ls, lt):
    ps = ls.exp()
    e = ls.sub_(lt).masked_fill_(ps == 0, 0.0)  # ls − lt
    d = (e * ps).sum(-1)
    return d, e.sub_(d[:, None]).mul_(ps)


def _jsd(ls, lt, beta):
    lm = _log_mix_into(lt, ls, beta, torch.empty_like(ls))
    p = lt.exp()
    k_t = _dot_(p, lt.sub_(lm))
    torch.exp(ls, out=p)  # p_S from here on
    e = ls.sub_(lm).masked_fill_(p == 0, 0.0)  # ls − lm
    k_s = (e * p).sum(-1)
    return beta * k_t + (1 - beta) * k_s, e.sub_(k_s[:, None]).mul_(p).mul_(1 - beta)


def _skew_kl(ls, lt, alpha):
    if alpha == 0:
        return _forward_kl(ls, lt)
    lm = _log_mix_into(lt, ls, alpha, torch.empty_like(ls))
    pt = lt.exp()
    d = _dot(pt, lt.sub_(lm))
    r = lt.add_(ls).exp_()  # p_T·p_S / M
    ps = ls.exp_()
    return d, ps.mul_(r.sum(-1, keepdim=True)).sub_(r).mul_(1 - alpha)


def _skew_rkl(ls, lt, alpha):
    if alpha == 0:
        return _reverse_kl(ls, lt)
    lm = _log_mix_into(ls, lt, alpha, torch.empty_like(ls))
    ps = lt.copy_(ls).exp_()  # lt is not needed again: its buffer holds p_S
    e = ls.sub_(lm).masked_fill_(ps == 0, 0.0)  # ls − lm
    d = (e * ps).sum(-1)
    # α·p_S / M <= 1 as M >= α·p_S; p_S / M alone can overflow (inf − inf = NaN) when α is tiny
    au = torch.add(e, math.log(alpha), out=lm).exp_()
    alpha_sum_q = (au * ps).sum(-1, keepdim=True)
    return d, e.sub_(d[:, None]).sub_(au.sub_(alpha_sum_q)).mul_(ps)


def _tv(ls, lt):
    ps, sigma = ls.exp_(), lt.exp_().sub_(ls)  # sigma: p_T − p_S, then its sign
    d = 0.5 * sigma.abs().sum(-1)
    sigma.sign_()
    return d, sigma.sub_((sigma * ps).sum(-1, keepdim=True)).mul_(ps).mul_(-0.5)


def divergence_with_grad(student_logits: Tensor, teacher_logits: Tensor, kind: str, *, temperature: float = 1.0,
                         beta: float = 0.5, alpha: float = 0.1, owned: bool = False) -> tuple[Tensor, Tensor]:
    """(d [N], ∂d_n/∂s_n [N, V]) for rows of logits [N, V]: token_divergence and its gradient w.r.t. the student
    logits, with the same arguments (already checked by the caller). owned=True lets the function overwrite
    both logit tensors (the caller's own chunk buffers). Values in float32, or float64 when given float64."""
    T = float(temperature)
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    ls = _log_probs(student_logits, T, dtype, owned)
    lt = _log_probs(teacher_logits, T, dtype, owned)
    if kind in ("jsd", "skew_kl", "skew_rkl"):
        weight = float(beta if kind == "jsd" else alpha)
        d, g = {"jsd": _jsd, "skew_kl": _skew_kl, "skew_rkl": _skew_rkl}[kind](ls, lt, weight)
    else:
        d, g = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "tv": _tv}[kind](ls, lt)
    return d * (T * T), g.mul_(T)


def cross_entropy_with_grad(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(ce [N], ∂ce_n/∂s_n [N, V]) to integer labels in [0, V) or −1 (unlabelled: value and gradient 0)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    counted = labels >= 0
    y = labels.clamp_min(0)[:, None]
    log_p = torch.log_softmax(logits.to(dtype), dim=-1)
    ce = -log_p.gather(-1, y).squeeze(-1).masked_fill_(~counted, 0.0)
    grad = log_p.exp_()
    grad.scatter_add_(-1, y, torch.full_like(y, -1, dtype=dtype))
    return ce, grad.mul_(counted[:, None])
