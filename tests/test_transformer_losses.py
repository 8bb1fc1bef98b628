"""Tests for distill.losses.transformer: each loss against an independent float64 computation written
from the paper's formula with plain Python loops, plus padding garbage, head averaging, gradients and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.errors import NonFiniteError, UserError
from distill.losses.transformer import attention_kl, attention_mse, embedding_mse, hidden_cosine, hidden_mse

RTOL, ATOL = 1e-9, 1e-12
FLOOR = 1e-12  # the documented student-probability floor of attention_kl

# Padding in different places per row, including a sequence that is all padding.
RAGGED = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
B, L = RAGGED.shape


# ---------------------------------------------------------------- independent references
# Plain Python loops in float64 over batch, positions, heads and units, straight from the papers' formulas.


def _keep(mask, b, l):  # noqa: E741
    return True if mask is None else bool(mask[b][l])


def ref_hidden_mse(s, t, mask):
    """TinyBERT: sum of squared differences over kept tokens and hidden units / (kept tokens * D)."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    nb, nl, nd = s.shape
    total, kept = 0.0, 0
    for b in range(nb):
        for l in range(nl):  # noqa: E741
            if not _keep(mask, b, l):
                continue
            kept += 1
            for d in range(nd):
                total += (float(s[b, l, d]) - float(t[b, l, d])) ** 2
    return total / (kept * nd) if kept else 0.0


def ref_hidden_cosine(s, t, mask):
    """DistilBERT: mean over kept tokens of 1 - cos(h_s, h_t), each norm floored at 1e-8."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    nb, nl, nd = s.shape
    total, kept = 0.0, 0
    for b in range(nb):
        for l in range(nl):  # noqa: E741
            if not _keep(mask, b, l):
                continue
            kept += 1
            dot = sum(float(s[b, l, d]) * float(t[b, l, d]) for d in range(nd))
            ns = math.sqrt(sum(float(s[b, l, d]) ** 2 for d in range(nd)))
            nt = math.sqrt(sum(float(t[b, l, d]) ** 2 for d in range(nd)))
            total += 1.0 - dot / (max(ns, 1e-8) * max(nt, 1e-8))
    return total / kept if kept else 0.0


def _head_mean(a):
    """[B, H, L, L] -> [B, 1, L, L], the mean over heads, by loops."""
    nb, nh, nq, nk = a.shape
    out = np.zeros((nb, 1, nq, nk))
    for b in range(nb):
        for q in range(nq):
            for k in range(nk):
                out[b, 0, q, k] = sum(float(a[b, h, q, k]) for h in range(nh)) / nh
    return out


def _pair(s, t):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    if s.shape[1] != t.shape[1]:
        s, t = _head_mean(s), _head_mean(t)
    return s, t


def ref_attention_kl(s, t, mask):
    """MiniLM: 1/(H * kept queries) * sum_h sum_{q kept} sum_{k kept} A_t (log A_t - log max(A_s, floor))."""
    s, t = _pair(s, t)
    nb, nh, nl, _ = t.shape
    total, rows = 0.0, 0
    for b in range(nb):
        for q in range(nl):
            if not _keep(mask, b, q):
                continue
            rows += 1
            for h in range(nh):
                for k in range(nl):
                    if not _keep(mask, b, k):
                        continue
                    pt, ps = float(t[b, h, q, k]), float(s[b, h, q, k])
                    if pt == 0.0:
                        continue
                    total += pt * (math.log(pt) - math.log(max(ps, FLOOR)))
    return total / (nh * rows) if rows else 0.0


def ref_attention_mse(s, t, mask):
    """TinyBERT: mean over heads and kept (query, key) pairs of (A_s - A_t)^2."""
    s, t = _pair(s, t)
    nb, nh, nl, _ = t.shape
    total, count = 0.0, 0
    for b in range(nb):
        for h in range(nh):
            for q in range(nl):
                for k in range(nl):
                    if _keep(mask, b, q) and _keep(mask, b, k):
                        count += 1
                        total += (float(s[b, h, q, k]) - float(t[b, h, q, k])) ** 2
    return total / count if count else 0.0


# ---------------------------------------------------------------- inputs


def _randn(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _attn(heads, seed, mask=RAGGED, length=None):
    """Attention probabilities as a real model gives them: softmax over keys, padded keys exactly 0."""
    nb, nl = (B, L) if mask is None else mask.shape
    nl = length or nl
    scores = _randn((nb, heads, nl, nl), seed, scale=2.0)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # an all-padding sequence: rows of 0 rather than nan


def _close(got, expected):
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=RTOL, atol=ATOL)


def _pad_garbage(x, mask, value):
    """Fill every padded token of a [B, L, ...] tensor with ``value``."""
    x = x.clone()
    x[~mask] = value
    return x


def _attn_garbage(a, mask, row_value, key_value):
    """Fill padded query rows with ``row_value`` and padded key columns of the real rows with ``key_value``."""
    a = a.clone()
    a.masked_fill_(~mask[:, None, None, :], key_value)
    a.masked_fill_(~mask[:, None, :, None], row_value)
    return a


HIDDEN_FNS = [(hidden_mse, ref_hidden_mse), (embedding_mse, ref_hidden_mse), (hidden_cosine, ref_hidden_cosine)]
ATTN_FNS = [(attention_kl, ref_attention_kl), (attention_mse, ref_attention_mse)]
HEADS = [(3, 3), (2, 4), (4, 1)]  # equal, and two Hs != Ht cases (head average)


# ---------------------------------------------------------------- against the references


@pytest.mark.parametrize("fn,ref", HIDDEN_FNS)
@pytest.mark.parametrize("mask", [RAGGED, None], ids=["ragged", "nomask"])
@pytest.mark.parametrize("width", [1, 6])
def test_hidden_losses_match_reference(fn, ref, mask, width):
    s, t = _randn((B, L, width), 1, 2.0), _randn((B, L, width), 2, 2.0)
    _close(fn(s, t, mask), ref(s.numpy(), t.numpy(), None if mask is None else mask.numpy()))


@pytest.mark.parametrize("fn,ref", ATTN_FNS)
@pytest.mark.parametrize("mask", [RAGGED, None], ids=["ragged", "nomask"])
@pytest.mark.parametrize("hs,ht", HEADS)
def test_attention_losses_match_reference(fn, ref, mask, hs, ht):
    s, t = _attn(hs, 3, mask), _attn(ht, 4, mask)
    _close(fn(s, t, mask), ref(s.numpy(), t.numpy(), None if mask is None else mask.numpy()))


def test_against_torch_builtins_without_padding():
    # Cross-checks with torch's own losses where they coincide (no padding, equal heads).
    s, t = _randn((2, 4, 5), 5), _randn((2, 4, 5), 6)
    torch.testing.assert_close(hidden_mse(s, t, None), F.mse_loss(s, t))
    target = torch.ones(8, dtype=torch.float64)
    expected = F.cosine_embedding_loss(s.reshape(8, 5), t.reshape(8, 5), target)
    torch.testing.assert_close(hidden_cosine(s, t, None), expected)
    a_s, a_t = _attn(2, 7, None), _attn(2, 8, None)
    rows = a_t.shape[0] * a_t.shape[1] * a_t.shape[2]
    torch.testing.assert_close(attention_kl(a_s, a_t, None), F.kl_div(a_s.log(), a_t, reduction="sum") / rows)
    torch.testing.assert_close(attention_mse(a_s, a_t, None), F.mse_loss(a_s, a_t))


def test_head_average_is_not_per_head_kl():
    # Hs != Ht compares the head-averaged maps: KL(mean_h A_t || mean_h A_s), not the mean of per-head KLs.
    s, t = _attn(2, 9), _attn(4, 10)
    m = RAGGED.numpy()
    expected = ref_attention_kl(_head_mean(s.numpy()), _head_mean(t.numpy()), m)
    _close(attention_kl(s, t, RAGGED), expected)
    _close(attention_kl(s.mean(1, keepdim=True), t.mean(1, keepdim=True), RAGGED), expected)


# ---------------------------------------------------------------- padding garbage never leaks


@pytest.mark.parametrize("fn,ref", HIDDEN_FNS)
@pytest.mark.parametrize("garbage", [1e30, math.inf, math.nan])
def test_hidden_padding_garbage_does_not_leak(fn, ref, garbage):
    s0, t = _randn((B, L, 4), 11), _randn((B, L, 4), 12)
    s = _pad_garbage(s0, RAGGED, 1e30).requires_grad_()
    t_bad = _pad_garbage(t, RAGGED, garbage).requires_grad_()
    loss = fn(s, t_bad, RAGGED)
    _close(loss, ref(s0.numpy(), t.numpy(), RAGGED.numpy()))
    loss.backward()
    for x in (s, t_bad):
        assert torch.isfinite(x.grad).all()
        assert torch.all(x.grad[~RAGGED] == 0)


@pytest.mark.parametrize("fn,ref", ATTN_FNS)
@pytest.mark.parametrize("hs,ht", HEADS)
@pytest.mark.parametrize("row_value,key_value", [(math.nan, -math.inf), (-math.inf, math.nan), (1e30, 1e30)])
def test_attention_padding_garbage_does_not_leak(fn, ref, hs, ht, row_value, key_value):
    s0, t0 = _attn(hs, 13), _attn(ht, 14)
    s = _attn_garbage(s0, RAGGED, 1e30, 1e30).requires_grad_()
    t = _attn_garbage(t0, RAGGED, row_value, key_value).requires_grad_()
    loss = fn(s, t, RAGGED)
    _close(loss, ref(s0.numpy(), t0.numpy(), RAGGED.numpy()))
    loss.backward()
    pair = RAGGED[:, None, :, None] & RAGGED[:, None, None, :]  # kept (query, key) pairs
    for x in (s, t):
        assert torch.isfinite(x.grad).all()
        assert torch.all(x.grad.masked_select(~pair.expand_as(x)) == 0)


def test_student_zero_probability_uses_floor():
    # Where the teacher is > 0 and the student is exactly 0 (underflow, attention dropout) the term is
    # finite: log is taken of the 1e-12 floor. Teacher zeros (causal-style) contribute nothing.
    s, t = _attn(2, 15).clone(), _attn(2, 16).clone()
    s[0, 0, 0, 1] = 0.0
    s[1, 1, 2, 0] = 0.0
    t[0, 1, 3, 2] = 0.0
    s.requires_grad_()
    t.requires_grad_()
    loss = attention_kl(s, t, RAGGED)
    assert torch.isfinite(loss)
    _close(loss, ref_attention_kl(s.detach().numpy(), t.detach().numpy(), RAGGED.numpy()))
    assert loss.item() > 1.0  # the floored term dominates: t * log(t / 1e-12)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert s.grad[0, 0, 0, 1] == 0  # below the floor the student gets no gradient


def test_nan_at_a_kept_position_propagates():
    # Only padding is forgiven: a nan the model produced at a real token must show, the teacher's as an error
    # (a NaN target gives NaN gradients), the student's in the loss.
    t = _attn(2, 17).clone()
    t[0, 0, 1, 1] = math.nan
    with pytest.raises(NonFiniteError, match="teacher_attn hold NaN"):
        attention_kl(_attn(2, 18), t, RAGGED)
    assert torch.isnan(attention_kl(t, _attn(2, 18), RAGGED))
    h = _randn((B, L, 3), 19)
    h[1, 2, 0] = math.nan
    assert torch.isnan(hidden_mse(h, _randn((B, L, 3), 20), RAGGED))


# ---------------------------------------------------------------- zero at the optimum, empty batches, masks, dtype


@pytest.mark.parametrize("hs", [3, 1])
def test_zero_when_student_equals_teacher(hs):
    h = _pad_garbage(_randn((B, L, 5), 21), RAGGED, math.nan)
    for fn in (hidden_mse, embedding_mse):
        assert fn(h, h.clone(), RAGGED).item() == 0.0
    assert abs(hidden_cosine(h, h.clone(), RAGGED).item()) < 1e-15
    a = _attn_garbage(_attn(hs, 22), RAGGED, math.nan, math.nan)
    assert attention_mse(a, a.clone(), RAGGED).item() == 0.0
    assert attention_kl(a, a.clone(), RAGGED).item() == 0.0
    b = _attn(hs, 23)
    assert attention_kl(b, b.clone(), None).item() == 0.0


def test_all_padding_is_zero_with_backward():
    none = torch.zeros(B, L, dtype=torch.bool)
    h = _randn((B, L, 3), 24).requires_grad_()
    a = _attn(2, 25, None).requires_grad_()
    losses = [fn(h, _randn((B, L, 3), 26), none) for fn in (hidden_mse, embedding_mse, hidden_cosine)]
    losses += [fn(a, _attn(2, 27, None), none) for fn in (attention_kl, attention_mse)]
    for loss in losses:
        assert loss.item() == 0.0 and loss.grad_fn is not None
    sum(losses).backward()
    assert torch.all(h.grad == 0) and torch.all(a.grad == 0)


@pytest.mark.parametrize("int_dtype", [torch.long, torch.int32, torch.uint8])
def test_integer_mask_equals_bool_mask(int_dtype):
    # HF's attention_mask is a long tensor of 0/1.
    h_s, h_t = _randn((B, L, 4), 28), _randn((B, L, 4), 29)
    a_s, a_t = _attn(2, 30), _attn(4, 31)
    m = RAGGED.to(int_dtype)
    for fn in (hidden_mse, embedding_mse, hidden_cosine):
        assert fn(h_s, h_t, m).item() == fn(h_s, h_t, RAGGED).item()
    for fn in (attention_kl, attention_mse):
        assert fn(a_s, a_t, m).item() == fn(a_s, a_t, RAGGED).item()


def test_half_inputs_are_upcast():
    h_s, h_t = _randn((B, L, 6), 32).half(), _randn((B, L, 6), 33).half()
    a_s, a_t = _attn(2, 34).half(), _attn(2, 35).bfloat16()
    m = RAGGED.numpy()
    for fn, ref, s, t in [(hidden_mse, ref_hidden_mse, h_s, h_t), (embedding_mse, ref_hidden_mse, h_s, h_t),
                          (hidden_cosine, ref_hidden_cosine, h_s, h_t), (attention_kl, ref_attention_kl, a_s, a_t),
                          (attention_mse, ref_attention_mse, a_s, a_t)]:
        got = fn(s, t, RAGGED)
        assert got.dtype == torch.float32
        # Reference on the half-rounded values, so only the compute precision is under test.
        np.testing.assert_allclose(got.item(), ref(s.double().numpy(), t.double().numpy(), m), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("mask", [RAGGED, None], ids=["ragged", "nomask"])
def test_teacher_from_inference_mode_backpropagates(mask):
    # Teachers usually run under torch.inference_mode(); their outputs must still work as loss targets.
    with torch.inference_mode():
        t_h, t_a = _randn((B, L, 4), 47), _attn(2, 48)
    s_h, s_a = _randn((B, L, 4), 49).requires_grad_(), _attn(2, 50).requires_grad_()
    for fn in (hidden_mse, embedding_mse, hidden_cosine):
        fn(s_h, t_h, mask).backward()
    for fn in (attention_kl, attention_mse):
        fn(s_a, t_a, mask).backward()
    assert torch.isfinite(s_h.grad).all() and torch.isfinite(s_a.grad).all()


def test_gradcheck_hidden_losses():
    mask = RAGGED[:3, :4]
    s, t = _randn((3, 4, 3), 36).requires_grad_(), _randn((3, 4, 3), 37).requires_grad_()
    for fn in (hidden_mse, embedding_mse, hidden_cosine):
        assert torch.autograd.gradcheck(lambda a, b, fn=fn: fn(a, b, mask), (s, t))
        assert torch.autograd.gradcheck(lambda a, b, fn=fn: fn(a, b, None), (s, t))


def test_hidden_cosine_is_scale_invariant_for_tiny_vectors():
    # The 1e-8 floor is per norm, so small but non-zero hidden states keep their exact cosine.
    s, t = _randn((B, L, 4), 45), _randn((B, L, 4), 46)
    torch.testing.assert_close(hidden_cosine(s * 1e-6, t * 1e-5, RAGGED), hidden_cosine(s, t, RAGGED))


def test_gradcheck_hidden_cosine_zero_vector():
    s = _randn((1, 2, 3), 38)
    s[0, 0] = 0.0  # a dead (all-zero) student token: cos = 0, gradient finite
    s.requires_grad_()
    t = _randn((1, 2, 3), 39)
    loss = hidden_cosine(s, t, None)
    _close(loss, ref_hidden_cosine(s.detach().numpy(), t.numpy(), None))
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("fn", [attention_kl, attention_mse])
@pytest.mark.parametrize("hs,ht", [(2, 2), (1, 3)])
def test_gradcheck_attention_losses(fn, hs, ht):
    # Strictly positive probabilities (no -inf scores) so every kept term is smooth; padding is masked.
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    s = torch.softmax(_randn((2, hs, 4, 4), 40), -1).requires_grad_()
    t = torch.softmax(_randn((2, ht, 4, 4), 41), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mask), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, None), (s, t))


# ---------------------------------------------------------------- user mistakes


def _h(*shape):
    return torch.zeros(shape)


def _a(*shape):
    return torch.full(shape, 1.0 / shape[-1])


BAD = [
    (hidden_mse, (_h(2, 5, 4), _h(2, 4, 4), None),
     r"student_hidden \(2, 5, 4\) and teacher_hidden \(2, 4, 4\).*\[B, L\]"),
    (hidden_mse, (_h(2, 5, 3), _h(2, 5, 4), None), r"\(2, 5, 3\) and teacher_hidden \(2, 5, 4\).*width.*W_h"),
    (embedding_mse, (_h(2, 5, 3), _h(2, 5, 4), None), r"student_emb \(2, 5, 3\) and teacher_emb \(2, 5, 4\).*W_e"),
    (hidden_cosine, (_h(2, 5, 3), _h(2, 5, 4), None), r"\(2, 5, 3\) and teacher_hidden \(2, 5, 4\).*width"),
    (hidden_mse, (_h(2, 5, 4), _h(2, 5, 4), torch.ones(2, 4, dtype=torch.bool)),
     r"mask shape \(2, 4\) must be \[B, L\] = \(2, 5\).*\(2, 5, 4\)"),
    (hidden_mse, (_h(2, 5, 4), _h(2, 5, 4), torch.ones(2, 5)), r"mask must be a bool or 0/1 integer"),
    (hidden_mse, (_h(2, 5, 4), _h(2, 5, 4), torch.full((2, 5), 7)), r"only 0 and 1 \(1 = real token\), found 7"),
    (hidden_mse, (_h(2, 5, 4), _h(2, 5, 4), [[1] * 5] * 2), r"mask must be .* tensor"),
    (hidden_mse, (_h(10, 4), _h(10, 4), None), r"student_hidden must be 3-D \[B, L, D\], got shape \(10, 4\)"),
    (hidden_cosine, (_h(2, 5, 4), torch.zeros(2, 5, 4, dtype=torch.long), None),
     r"teacher_hidden must be a floating"),
    (hidden_mse, (np.zeros((2, 5, 4)), _h(2, 5, 4), None), r"student_hidden must be a torch.Tensor"),
    (hidden_mse, (_h(2, 5, 0), _h(2, 5, 0), None), r"empty hidden dimension"),
    (attention_kl, (_a(2, 3, 5), _a(2, 3, 5), None), r"student_attn must be 4-D \[B, H, L, L\]"),
    (attention_mse, (_a(2, 3, 5, 4), _a(2, 3, 5, 4), None), r"square"),
    (attention_kl, (_a(2, 3, 5, 5), _a(2, 3, 6, 6), None),
     r"student_attn \(2, 3, 5, 5\) and teacher_attn \(2, 3, 6, 6\) must share B and L"),
    (attention_mse, (_a(2, 3, 5, 5), _a(3, 3, 5, 5), None), r"\(2, 3, 5, 5\) and teacher_attn \(3, 3, 5, 5\)"),
    (attention_kl, (_a(2, 3, 5, 5), _a(2, 2, 5, 5), torch.ones(2, 6, dtype=torch.bool)), r"mask shape \(2, 6\)"),
    (attention_kl, (_randn((2, 3, 5, 5), 42), _a(2, 3, 5, 5), None),
     r"student_attn must hold attention probabilities"),
]


@pytest.mark.parametrize("fn,args,match", BAD, ids=range(len(BAD)))
def test_bad_arguments_raise_one_line_user_error(fn, args, match):
    with pytest.raises(UserError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


def test_negative_values_only_at_padding_are_fine_for_kl():
    # Raw scores are rejected, but -inf or garbage sitting only in padding is not a user mistake.
    a = _attn_garbage(_attn(2, 43), RAGGED, -1e30, -math.inf)
    assert torch.isfinite(attention_kl(a, _attn(2, 44), RAGGED))


def test_mask_is_required_argument():
    # Padding must never count by accident: there is no default; None has to be passed explicitly.
    with pytest.raises(TypeError):
        hidden_mse(_h(1, 2, 3), _h(1, 2, 3))  # type: ignore[call-arg]
