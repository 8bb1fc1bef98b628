"""Stochastic Sobolev training: match the student's input derivatives to the teacher's.

Czarnecki, Osindero, Jaderberg, Świrszcz & Pascanu (NeurIPS 2017), "Sobolev Training for Neural
Networks". Order 1 only: besides the outputs, the student fits the teacher's first derivatives w.r.t.
the input. The full Jacobian (classes x input size) is never formed; as in the paper's stochastic
variant, both Jacobians are projected on random unit vectors v of input space and the projections
J·v (directional derivatives, Jacobian-vector products) are compared.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.finite import check_targets, finite
from distill.losses.kl import _ROW_REDUCTIONS, _check_reduction, _check_temperature, _upcast

__all__ = ["SOBOLEV_TARGETS", "random_unit_directions", "sobolev_target", "directional_derivatives", "sobolev_loss"]

SOBOLEV_TARGETS = ("logits", "log_probs")


def _check_input(x) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise UserError(f"x must be a floating-point tensor, got {got}")
    if x.dim() < 2 or x.shape[1:].numel() == 0:
        raise UserError(f"x must be a batch shaped [batch, features...] with features, got shape {tuple(x.shape)}")


def random_unit_directions(x: Tensor, n: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """n random directions per sample of ``x``, uniform on the unit sphere of one sample's input space.

        v[k, b] = g / ||g||_2,   g ~ N(0, I_D),   D = x[b].numel()

    (a normalised standard Gaussian is uniform on the sphere). Returns shape [n, *x.shape] in x's
    dtype and device; the norm is taken over all non-batch dimensions of one sample.
    """
    _check_input(x)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"n (directions per sample) must be an integer >= 1, got {n!r}")
    # draw in at least float32: half-precision Gaussians are coarse and their squared norms can overflow
    g = torch.randn((n, *x.shape), generator=generator, device=x.device, dtype=_upcast(x).dtype)
    norms = g.flatten(2).norm(dim=-1).clamp_min(torch.finfo(g.dtype).tiny)
    return (g / norms.view(n, x.shape[0], *[1] * (x.dim() - 1))).to(x.dtype)


def sobolev_target(logits: Tensor, target: str = "log_probs", temperature: float = 1.0) -> Tensor:
    """The function f of the logits z whose input derivatives are matched: the temperature-softened
    quantities that the order-0 soft term compares.

        target == "log_probs":  f(z) = log_softmax(z / T) = z/T − logsumexp(z/T)
        target == "logits":     f(z) = z / T

    d log_softmax(z/T) = (dz − Σ_c p_c dz_c) / T with p = softmax(z/T): the softened logit derivative,
    centred by the network's own probabilities. Unlike the logits, it is blind to adding any c(x) to all
    logits, which changes no prediction but changes the logit Jacobian by ∇c; and it is the derivative
    of the very distribution the order-0 KL matches. Both targets share the 1/T scale, so switching
    between them needs no new weight; no T² compensation is applied, so the squared derivatives, and
    the Sobolev term, shrink as 1/T² when T grows.
    """
    if target not in SOBOLEV_TARGETS:
        raise UserError(f"target must be one of {', '.join(map(repr, SOBOLEV_TARGETS))}, got {target!r}")
    T = _check_temperature(temperature)
    z = _upcast(logits) / T
    return z if target == "logits" else torch.log_softmax(z, dim=-1)


def directional_derivatives(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    v: Tensor,
    *,
    fn: Callable[[Tensor], Tensor] | None = None,
    create_graph: bool = True,
) -> tuple[Tensor, Tensor]:
    """(outputs, jvp): outputs = model(x) and jvp = J·v, J the Jacobian of y = fn(model(x)) w.r.t. x.

    Computed by the double-vector-Jacobian trick, with reverse mode only: for a dummy u shaped like y,
    g(u) = (∂y/∂x)ᵀ u is linear in u, so ∂⟨g(u), v⟩/∂u = (∂y/∂x) v. Reverse mode (not torch.func.jvp /
    forward AD) because it works with any nn.Module in train mode: dropout and BatchNorm run as in a
    normal forward, the outputs and the derivatives come from that one forward (same dropout mask), and
    backward-over-forward fails on log_softmax in torch 2.x. Cost: one forward, one backward, one
    double-backward per direction.

    v: shaped like x (one direction per sample) -> jvp shaped like y; or [n, *x.shape] -> [n, *y.shape]
    (the forward and the first backward are shared by the n directions). jvp[b] = Σ_b' ∂y_b/∂x_b' · v_b':
    for a model in eval mode only b' = b contributes, i.e. the per-sample directional derivative; a
    BatchNorm layer in train mode couples the samples of a batch and adds its cross terms.

    create_graph=True (student): outputs and jvp stay differentiable w.r.t. the model's parameters.
    create_graph=False (frozen teacher): no graph is kept and both results are detached.
    The model is called in whatever mode (train/eval) it is in.
    """
    _check_input(x)
    if not isinstance(v, Tensor) or (v.shape != x.shape and (v.shape[1:] != x.shape or v.shape[0] == 0)):
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise UserError(f"v must be shaped like x {tuple(x.shape)} or [n, *x.shape], got {got}")
    many = v.dim() == x.dim() + 1
    vs = v if many else v.unsqueeze(0)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        outputs = model(x)
        y = outputs if fn is None else fn(outputs)
        u = torch.zeros_like(y, requires_grad=True)
        if y.requires_grad:
            (g,) = torch.autograd.grad(y, x, u, create_graph=True, allow_unused=True, materialize_grads=True)
        else:
            g = torch.zeros_like(x)  # y does not depend on x at all: every derivative is 0
        jvps = []
        for k, vk in enumerate(vs):
            if g.requires_grad:
                keep = create_graph or k < len(vs) - 1
                (jv,) = torch.autograd.grad(g, u, vk.to(g.dtype), retain_graph=keep, create_graph=create_graph,
                                            allow_unused=True, materialize_grads=True)
            else:
                jv = torch.zeros_like(y)  # g was materialised as zeros: y has no path from x, so J = 0
            jvps.append(jv)
    jvp = torch.stack(jvps) if many else jvps[0]
    if not create_graph:
        return outputs.detach(), jvp.detach()
    return outputs, jvp


def sobolev_loss(student_jvp: Tensor, teacher_jvp: Tensor, *, reduction: str = "batchmean") -> Tensor:
    """Squared error between the student's and the teacher's directional derivatives.

    Inputs are [B, C] (one direction per sample) or [K, B, C] (K directions per sample), as returned
    by ``directional_derivatives``. Per sample b:

        loss_b = Σ_k Σ_c (Js·v_{b,k} − Jt·v_{b,k})_c²

    ``reduction``: "batchmean" = (1/B) Σ_b loss_b (summed over directions and outputs, averaged over
    samples); "sum" = Σ_b loss_b; "none" = the [B] vector of loss_b. For v uniform on the unit sphere of
    a D-dimensional input, E[loss_b] = K · ||Js − Jt||_F² / D, so K directions also weigh the term K
    times. Half-precision inputs are computed in float32.
    """
    _check_reduction(reduction, _ROW_REDUCTIONS)
    for name, t in (("student_jvp", student_jvp), ("teacher_jvp", teacher_jvp)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise UserError(f"{name} must be a floating-point tensor, got {got}")
        if t.dim() not in (2, 3):
            raise UserError(f"{name} must be shaped [B, C] or [K, B, C], got shape {tuple(t.shape)}")
    if student_jvp.shape != teacher_jvp.shape:
        raise UserError(
            f"student_jvp shape {tuple(student_jvp.shape)} and teacher_jvp shape {tuple(teacher_jvp.shape)} must be identical"
        )
    s, t = _upcast(student_jvp), _upcast(teacher_jvp)
    sq = (s - t.to(s.dtype)).pow(2)
    per_sample = sq.sum(-1) if sq.dim() == 2 else sq.sum(dim=(0, -1))
    if reduction == "none":
        loss = per_sample
    else:
        total = per_sample.sum()
        loss = total if reduction == "sum" else total / max(per_sample.shape[0], 1)
    if not finite(loss):
        check_targets(teacher_jvp=teacher_jvp, rows=False)
    return loss
