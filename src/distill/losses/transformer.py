"""Intermediate-layer losses for distilling transformers, masked so padding tokens never count.

- ``hidden_mse`` / ``embedding_mse``: TinyBERT (Jiao et al., 2020, "TinyBERT: Distilling BERT for Natural
  Language Understanding"), hidden-state and embedding-layer MSE.
- ``hidden_cosine``: DistilBERT (Sanh et al., 2019, "DistilBERT, a distilled version of BERT"), cosine
  embedding loss between hidden states.
- ``attention_kl``: MiniLM (Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation for
  Task-Agnostic Compression of Pre-Trained Transformers"), KL between self-attention distributions.
- ``attention_mse``: TinyBERT's attention-matrix MSE.

Shapes follow Hugging Face: hidden states [B, L, D] (``output_hidden_states=True``), attention maps
[B, H, L, L] of probabilities (``output_attentions=True``), ``mask`` the [B, L] ``attention_mask`` (bool, or
integer 0/1; True/1 = real token). ``mask`` is a required argument so padding is never counted by accident;
pass ``None`` explicitly to count every position. Positions the mask drops are removed *before* anything is
computed, so whatever they hold (huge values, inf, nan) reaches neither the loss nor the gradients, and they get
a gradient of exactly 0. When no position is kept the loss is a 0 still connected to the inputs' graph. NaN or inf
at a kept position of the teacher's tensor raises NonFiniteError (distill.finite); of the student's, shows in the loss.
Half-precision inputs are computed in float32. Each function returns the paper's mean as a 0-d tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.errors import UserError
from distill.finite import check_targets, finite
from distill.losses.kl import _upcast

__all__ = ["hidden_mse", "embedding_mse", "hidden_cosine", "attention_kl", "attention_mse"]

_PROB_FLOOR = 1e-12  # student probability floor inside log() in attention_kl
_NORM_EPS = 1e-8  # norm floor in hidden_cosine (as torch.nn.functional.cosine_similarity)


# ---------------------------------------------------------------- validation / selection helpers


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_tensor(name: str, x, dims: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise UserError(f"{name} must be a floating-point tensor, got {x.dtype}; convert it with .float()")
    if x.dim() != dims:
        raise UserError(f"{name} must be {dims}-D {layout}, got shape {_shape(x)}")


def _keep_mask(mask, batch: int, length: int, device, pair: str) -> Tensor | None:
    """Validate ``mask`` as [B, L] bool or integer 0/1 and return it as a bool tensor on ``device``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise UserError(f"mask must be a [B, L] bool or 0/1 integer tensor (or None), got {type(mask).__name__}")
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise UserError(f"mask must be a bool or 0/1 integer tensor like HF's attention_mask, got {mask.dtype}; "
                        f"pass mask.bool()")
    if _shape(mask) != (batch, length):
        raise UserError(f"mask shape {_shape(mask)} must be [B, L] = {(batch, length)}, the leading shape of {pair}")
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise UserError(f"an integer mask must hold only 0 and 1 (1 = real token), found {mask[bad][0].item()}; "
                            f"is it token ids rather than the attention_mask?")
        mask = mask != 0
    return mask.to(device)


def _check_hidden_pair(s_name: str, s, t_name: str, t, mask, width_hint: str) -> Tensor | None:
    _check_tensor(s_name, s, 3, "[B, L, D]")
    _check_tensor(t_name, t, 3, "[B, L, D]")
    pair = f"{s_name} {_shape(s)} and {t_name} {_shape(t)}"
    if s.shape[:2] != t.shape[:2]:
        raise UserError(f"{pair} must share the leading [B, L]")
    if s.shape[2] != t.shape[2]:
        raise UserError(f"{pair} must have the same width D; {width_hint}")
    if s.shape[2] == 0:
        raise UserError(f"{pair} have an empty hidden dimension D")
    return _keep_mask(mask, s.shape[0], s.shape[1], s.device, pair)


def _outside_inference(x: Tensor) -> Tensor:
    # A teacher run under torch.inference_mode() gives inference tensors, which autograd refuses to save for
    # backward (e.g. t in s * t). Selecting with a mask already copies; without one, copy here.
    return x.clone() if x.is_inference() and not torch.is_inference_mode_enabled() else x


def _kept_tokens(s: Tensor, t: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """[B, L, D] pair -> [N_kept, D] pair in a common dtype of at least float32.
    Padding tokens are dropped before any arithmetic so their content can never leak."""
    s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    if keep is not None:
        flat = keep.reshape(-1)
        s2, t2 = s2[flat], t2[flat]
    s2, t2 = _outside_inference(_upcast(s2)), _outside_inference(_upcast(t2))  # upcast only the kept tokens
    dtype = torch.promote_types(s2.dtype, t2.dtype)
    return s2.to(dtype), t2.to(dtype)


def _masked_mse(s_name: str, s: Tensor, t_name: str, t: Tensor, mask, projection: str) -> Tensor:
    hint = f"project the student to the teacher's width first (TinyBERT's {projection}, an nn.Linear(Ds, Dt))"
    keep = _check_hidden_pair(s_name, s, t_name, t, mask, hint)
    s2, t2 = _kept_tokens(s, t, keep)
    # Divide by kept tokens * D; max() keeps an all-padding batch at 0 instead of nan.
    return _checked((s2 - t2).pow(2).sum() / max(s2.numel(), 1), t_name, t2)


def _attention_rows(student_attn, teacher_attn, mask) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate a pair of [B, H, L, L] attention maps and select the kept query rows.

    Returns ``s`` [N, Hs, L], ``t`` [N, Ht, L] (at least float32, common dtype) for the N kept (b, q) rows,
    and ``keys`` [N, 1, L] bool marking the kept key positions of each row (None when there is no mask).
    """
    _check_tensor("student_attn", student_attn, 4, "[B, H, L, L]")
    _check_tensor("teacher_attn", teacher_attn, 4, "[B, H, L, L]")
    pair = f"student_attn {_shape(student_attn)} and teacher_attn {_shape(teacher_attn)}"
    for name, a in (("student_attn", student_attn), ("teacher_attn", teacher_attn)):
        if a.shape[2] != a.shape[3]:
            raise UserError(f"{name} must be square self-attention [B, H, L, L], got shape {_shape(a)}")
        if a.shape[1] == 0:
            raise UserError(f"{name} has no heads, shape {_shape(a)}")
    if student_attn.shape[0] != teacher_attn.shape[0] or student_attn.shape[2] != teacher_attn.shape[2]:
        raise UserError(f"{pair} must share B and L (only the head count H may differ)")
    batch, length = student_attn.shape[0], student_attn.shape[2]
    keep = _keep_mask(mask, batch, length, student_attn.device, pair)

    def rows(a: Tensor) -> Tensor:
        a = a.transpose(1, 2)  # [B, L(query), H, L(key)]
        return _outside_inference(_upcast(a.reshape(batch * length, a.shape[2], length) if keep is None else a[keep]))

    s, t = rows(student_attn), rows(teacher_attn)
    dtype = torch.promote_types(s.dtype, t.dtype)
    keys = None if keep is None else keep.unsqueeze(1).expand(batch, length, length)[keep].unsqueeze(1)
    return s.to(dtype), t.to(dtype), keys


def _checked(loss: Tensor, name: str, target: Tensor) -> Tensor:
    """`loss`, or NonFiniteError when it is not finite because the kept part of the teacher's tensor `name` holds
    NaN or inf (distill.finite.check_targets)."""
    if not finite(loss):
        check_targets(rows=False, **{name: target})
    return loss


def _head_average(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    if s.shape[1] != t.shape[1]:
        return s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    return s, t


# ---------------------------------------------------------------- hidden states


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None) -> Tensor:
    """TinyBERT hidden-state loss: MSE(H_s W_h, H_t) over the real (unpadded) tokens.

        loss = (1 / (N · D)) · Σ_{(b,l) kept} Σ_d (H_s[b,l,d] − H_t[b,l,d])²,   N = number of kept tokens

    Jiao et al. (2020), "TinyBERT: Distilling BERT for Natural Language Understanding", §3.1, the hidden-states
    loss L_hidn. The projection W_h is the caller's: ``student_hidden`` [B, L, D] must already have the teacher's
    width D (apply an nn.Linear(Ds, Dt) first when they differ). ``teacher_hidden`` [B, L, D]; ``mask`` [B, L]
    bool or 0/1 (True = real token; None = count every token). Padding tokens are left out of the sum and of N.
    """
    return _masked_mse("student_hidden", student_hidden, "teacher_hidden", teacher_hidden, mask, "W_h")


def embedding_mse(student_emb: Tensor, teacher_emb: Tensor, mask: Tensor | None) -> Tensor:
    """TinyBERT embedding-layer loss: MSE(E_s W_e, E_t) over the real (unpadded) tokens.

        loss = (1 / (N · D)) · Σ_{(b,l) kept} Σ_d (E_s[b,l,d] − E_t[b,l,d])²,   N = number of kept tokens

    Jiao et al. (2020), "TinyBERT", §3.1, the embedding-layer loss L_embd. The same computation as
    ``hidden_mse``, applied to the embedding-layer outputs (``hidden_states[0]`` in HF). ``student_emb``
    [B, L, D] must already be projected to the teacher's width by the caller's W_e; ``teacher_emb`` [B, L, D];
    ``mask`` [B, L] bool or 0/1 (None = every token).
    """
    return _masked_mse("student_emb", student_emb, "teacher_emb", teacher_emb, mask, "W_e")


def hidden_cosine(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None) -> Tensor:
    """DistilBERT cosine embedding loss (target 1) between hidden states, over the real tokens.

        cos(h_s, h_t) = <h_s, h_t> / (max(‖h_s‖₂, ε) · max(‖h_t‖₂, ε)),   ε = 1e-8
        loss = (1 / N) · Σ_{(b,l) kept} (1 − cos(H_s[b,l], H_t[b,l])),     N = number of kept tokens

    Sanh et al. (2019), "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter", the
    cosine embedding loss L_cos (their code: nn.CosineEmbeddingLoss, target 1, on the kept tokens' hidden states).
    Each norm is floored at ε separately (as torch.nn.functional.cosine_similarity does), so an all-zero vector
    gives cos = 0 with finite gradients. Widths must match: DistilBERT's student has the teacher's hidden size;
    project the student first otherwise. ``mask`` [B, L] bool or 0/1 (None = every token).
    """
    keep = _check_hidden_pair("student_hidden", student_hidden, "teacher_hidden", teacher_hidden, mask,
                              "the cosine needs equal widths (DistilBERT keeps the teacher's hidden size), "
                              "so project the student to the teacher's width first")
    s, t = _kept_tokens(student_hidden, teacher_hidden, keep)
    eps2 = _NORM_EPS * _NORM_EPS
    # sqrt(clamp(‖x‖², ε²)) rather than clamp(‖x‖): the gradient of a norm at 0 is 0/0.
    norm_s = s.pow(2).sum(-1).clamp_min(eps2).sqrt()
    norm_t = t.pow(2).sum(-1).clamp_min(eps2).sqrt()
    cos = (s * t).sum(-1) / (norm_s * norm_t)
    return _checked((1.0 - cos).sum() / max(cos.shape[0], 1), "teacher_hidden", t)


# ---------------------------------------------------------------- attention maps


def attention_kl(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None) -> Tensor:
    """MiniLM self-attention distribution transfer: KL(teacher ‖ student) per head and query, over real tokens.

        loss = (1 / (H · N)) · Σ_h Σ_{(b,q) kept} Σ_{k kept} t · (log t − log max(s, 1e-12)),
        t = A_t[b,h,q,k],  s = A_s[b,h,q,k]

    with terms where t == 0 taken as 0 and N = number of kept query positions over the batch. Wang et
    al. (2020), "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers", §3.1, L_AT (KL between the teacher's and the student's attention distributions, averaged
    over heads and positions).

    Inputs are attention *probabilities* [B, H, L, L] (softmax outputs, what HF returns with
    ``output_attentions=True``), not pre-softmax scores; a negative value at a kept position raises. ``mask``
    [B, L] bool or 0/1 (None = every position): dropped query rows are left out of the sum and of N, and
    dropped key columns are left out of each row's sum (their probability is ~0 in a real model anyway, so this
    changes nothing for well-formed input, but keeps garbage there from leaking).

    Zeros: a teacher term with probability 0 contributes exactly 0 (0 · log 0 = 0, also in the gradient). Where
    the teacher's probability is > 0 the student's is floored at 1e-12 inside the log only, so a student
    probability of exactly 0 (underflow, or the zeros that HF's attention dropout puts into the maps it returns
    in train mode) gives a large but finite term instead of inf/nan. NaN at a kept position still propagates: the
    student's gives a NaN loss, the teacher's raises NonFiniteError.

    Head counts: when the student and teacher have different numbers of heads (Hs != Ht), each model's maps are
    first averaged over its heads into one [B, 1, L, L] map (still a distribution per query) and the KL is taken
    between the two averages, so H = 1 above. This is *not* MiniLM-v2's multi-head self-attention relation
    distillation, which instead concatenates and re-splits the queries/keys/values into a common number of
    relation heads; that needs the Q/K/V vectors, not the attention maps.
    """
    s, t, keys = _attention_rows(student_attn, teacher_attn, mask)
    for name, a in (("student_attn", s), ("teacher_attn", t)):
        negative = a < 0 if keys is None else (a < 0) & keys
        if bool(negative.any()):
            raise UserError(f"{name} must hold attention probabilities (softmax outputs, output_attentions=True), "
                            f"found a negative value at a kept position; pre-softmax scores are not supported")
    s, t = _head_average(s, t)
    if keys is not None:
        t = torch.where(keys, t, 0.0)  # dropped keys: teacher weight 0, whatever they held
    # `!= 0` rather than `> 0` (negatives were rejected above) so a nan at a kept position propagates.
    # Double where: the branch not taken must be finite, or its zero gradient times inf/nan gives nan.
    nonzero = t != 0
    t_safe = torch.where(nonzero, t, 1.0)
    s_safe = torch.where(nonzero, s.clamp_min(_PROB_FLOOR), 1.0)
    terms = torch.where(nonzero, t_safe * (t_safe.log() - s_safe.log()), 0.0)
    rows, heads = t.shape[0], t.shape[1]
    return _checked(terms.sum() / (heads * max(rows, 1)), "teacher_attn", t)


def attention_mse(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None) -> Tensor:
    """TinyBERT attention-based loss: MSE between attention maps over real query and key positions.

        loss = (1 / (H · P)) · Σ_h Σ_b Σ_{q kept} Σ_{k kept} (A_s[b,h,q,k] − A_t[b,h,q,k])²,   P = Σ_b n_b²

    where n_b is the number of kept tokens of sequence b, so P counts the kept (query, key) pairs. Jiao et al.
    (2020), "TinyBERT", §3.1, the attention-based loss L_attn = (1/h) Σ_i MSE(A_i^S, A_i^T), with padded query
    rows and key columns left out of both the sum and the count (TinyBERT's code instead zeroes the padded-key
    scores and averages over all B·h·L² entries, padded query rows included).

    TinyBERT uses the *unnormalised* attention scores QKᵀ/√d; HF returns the softmax *probabilities*
    (``output_attentions=True``), so with HF models this is an MSE between probabilities, a different scale (and
    gradient) from the paper's. Pre-softmax scores also work if you have them, as long as any -inf sits only at
    positions ``mask`` drops. ``mask`` [B, L] bool or 0/1 (None = every position). When Hs != Ht both models'
    maps are first averaged over heads (as in ``attention_kl``), so H = 1 above.
    """
    s, t, keys = _attention_rows(student_attn, teacher_attn, mask)
    s, t = _head_average(s, t)
    if keys is None:
        diff, pairs = s - t, s.shape[0] * s.shape[2]
    else:
        diff, pairs = torch.where(keys, s - t, 0.0), int(keys.sum())  # dropped keys: 0, whatever they held
    # max() keeps an all-padding batch at 0 instead of nan.
    loss = diff.pow(2).sum() / (diff.shape[1] * max(pairs, 1))
    return _checked(loss, "teacher_attn", t if keys is None else torch.where(keys, t, 0.0))
