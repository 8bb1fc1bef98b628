"""Property tests (hypothesis) of every loss and divergence in distill.losses: finite inputs, large logits
(±1e4) and the temperatures the configs allow included, give finite values and finite gradients; the known
identities hold on random inputs. tests/test_losses.py holds the KL's own properties (non-negativity,
Pinsker, invariance to a shift of a row, T² scaling); this file does not repeat them.

Settings are bounded and derandomized, so CI is reproducible and all of it runs in seconds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import hard_label_loss, kd_loss, logit_mse, soft_target_cross_entropy, soft_target_kl
from distill.losses.bss import boundary_samples
from distill.losses.chunked import chunked_loss_sums, fused_loss_sums
from distill.losses.divergence import KINDS, token_divergence
from distill.losses.divergence_grad import divergence_with_grad
from distill.losses.dkd import dkd_loss
from distill.losses.feature import attention_transfer_loss, hint_loss
from distill.losses.mutual import mutual_loss
from distill.losses.noise import perturb_logits
from distill.losses.sobolev import sobolev_loss, sobolev_target
from distill.losses.topk import topk_kd_loss
from distill.losses.transformer import attention_kl, attention_mse, embedding_mse, hidden_cosine, hidden_mse

PROPS = settings(max_examples=50, deadline=None, derandomize=True, database=None)

# the temperatures a recipe may give (any T > 0): the extremes and the usual values
TEMPERATURES = st.one_of(st.sampled_from([0.01, 0.1, 1.0, 4.0, 100.0]), st.floats(0.5, 20.0))
# logits of the usual size, and saturated ones (±1e4: one class holds all the mass, the others underflow)
VALUES = st.one_of(st.floats(-20.0, 20.0), st.sampled_from([-1e4, 1e4, 0.0]))


@st.composite
def logits(draw, rows=(1, 5), classes=(2, 7), pair=True):
    """(student, teacher) logits [N, C] (or one tensor), float32 or float64, each row a mix of VALUES."""
    n, c = draw(st.integers(*rows)), draw(st.integers(*classes))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    def make():
        return torch.tensor(draw(st.lists(VALUES, min_size=n * c, max_size=n * c)), dtype=dtype).reshape(n, c)

    return (make(), make()) if pair else make()


def _labels(draw_from, n: int, c: int) -> torch.Tensor:
    return torch.tensor(draw_from(st.lists(st.integers(-1, c - 1), min_size=n, max_size=n)), dtype=torch.long)


def _finite_with_grad(value_of, *inputs) -> torch.Tensor:
    """value_of(*inputs that require grad): its value is finite and so is the gradient of its sum to every input."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    value = value_of(*leaves)
    assert bool(torch.isfinite(value).all()), value
    value.sum().backward()
    for x in leaves:
        assert x.grad is None or bool(torch.isfinite(x.grad).all()), x.grad
    return value.detach()


def _close(a, b, dtype, scale=1.0):
    """Equal to float rounding: relative to the size of the numbers that made them (float32 or float64)."""
    tol = (1e-4 if dtype == torch.float32 else 1e-9) * max(1.0, scale)
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol)


# ---------------------------------------------------------------- finite in, finite out (values and gradients)


@PROPS
@given(logits(), TEMPERATURES, st.data())
def test_kd_losses_are_finite_with_finite_gradients(pair, T, data):
    s, t = pair
    y = _labels(data.draw, *s.shape)
    for soft in ("kl", "soft_ce", "mse"):
        _finite_with_grad(lambda a, b: kd_loss(a, b, y, temperature=T, soft=soft)[0], s, t)
    _finite_with_grad(lambda a, b: hard_label_loss(a, y, b), s, t)
    _finite_with_grad(lambda a, b: dkd_loss(a, b, y, temperature=T)[0], s, t)
    for rest in ("renormalize", "bucket"):
        k = data.draw(st.integers(1, s.shape[1]))
        _finite_with_grad(lambda a, b: topk_kd_loss(a, b, k, temperature=T, rest=rest), s, t)


@PROPS
@given(logits(), TEMPERATURES, st.floats(0.01, 0.99), st.floats(0.0, 0.99))
def test_every_divergence_is_finite_with_finite_gradients(pair, T, beta, alpha):
    s, t = pair
    for kind in KINDS:
        _finite_with_grad(lambda a, b: token_divergence(a, b, kind, temperature=T, beta=beta, alpha=alpha), s, t)
        d, g = divergence_with_grad(s, t, kind, temperature=T, beta=beta, alpha=alpha)
        assert bool(torch.isfinite(d).all()) and bool(torch.isfinite(g).all())


@PROPS
@given(st.lists(logits(pair=False, rows=(3, 3), classes=(4, 4)), min_size=2, max_size=3), TEMPERATURES, st.booleans())
def test_mutual_loss_is_finite_with_finite_gradients(students, T, with_teacher):
    teacher = students[0].flip(-1) if with_teacher else None
    y = torch.tensor([0, -1, 3])
    dtype = students[0].dtype
    students = [z.to(dtype) for z in students]
    _finite_with_grad(lambda *z: mutual_loss(list(z), y, temperature=T, teacher_logits=teacher)[0], *students)


@PROPS
@given(logits(), TEMPERATURES, st.sampled_from(["logits", "log_probs"]), st.floats(0.0, 2.0))
def test_sobolev_target_and_loss_and_noise_are_finite(pair, T, target, sigma):
    s, t = pair
    _finite_with_grad(lambda a, b: sobolev_loss(sobolev_target(a, target, T), sobolev_target(b, target, T)), s, t)
    for mode in ("multiplicative", "additive"):
        assert bool(torch.isfinite(perturb_logits(t, sigma, mode)).all())


@PROPS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 4), st.sampled_from([1.0, 1e3]), st.floats(0.5, 3.0))
def test_feature_and_transformer_losses_are_finite_with_finite_gradients(b, length, d, scale, p):
    g = torch.Generator().manual_seed(b * 100 + length * 10 + d)
    s, t = (torch.randn(b, length, d, generator=g) * scale for _ in range(2))
    mask = torch.rand(b, length, generator=g) > 0.3
    for fn in (hidden_mse, embedding_mse, hidden_cosine):
        _finite_with_grad(lambda x, z: fn(x, z, mask), s, t)
    attn_s, attn_t = (torch.softmax(torch.randn(b, 2, length, length, generator=g) * scale, -1) for _ in range(2))
    for fn in (attention_kl, attention_mse):
        _finite_with_grad(lambda x, z: fn(x, z, mask), attn_s, attn_t)
    _finite_with_grad(hint_loss, s, t)
    maps_s, maps_t = (torch.relu(torch.randn(b, 3, length + 1, d, generator=g)) * scale for _ in range(2))
    at = _finite_with_grad(lambda x, z: attention_transfer_loss(x, z, p), maps_s, maps_t)
    assert 0 <= float(at) <= 4 + 1e-5  # each map has norm 1 (or is 0)


@PROPS
@given(st.floats(0.01, 1.0), st.integers(1, 5))
def test_boundary_samples_of_finite_inputs_are_finite_and_in_range(step_size, steps):
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(6, 1, 4, 4)
    base = teacher(x).argmax(-1)
    adv = boundary_samples(teacher, x, base, (base + 1) % 3, steps=steps, step_size=step_size, clamp=(0.0, 1.0))
    assert bool(torch.isfinite(adv).all()) and float(adv.min()) >= 0 and float(adv.max()) <= 1


# ---------------------------------------------------------------- identities


@PROPS
@given(logits(), TEMPERATURES, st.floats(0.01, 0.99), st.floats(0.0, 0.99), st.integers(2, 7))
def test_divergences_are_zero_from_a_distribution_to_itself_else_nonnegative_and_bounded(pair, T, beta, alpha, k):
    s, t = pair
    scale = T * T  # every divergence carries T²
    for kind in KINDS:
        d = token_divergence(s, t, kind, temperature=T, beta=beta, alpha=alpha)
        assert bool((d >= -1e-4 * scale).all()), (kind, d)
        same = token_divergence(t, t.clone(), kind, temperature=T, beta=beta, alpha=alpha)
        _close(same, torch.zeros_like(same), s.dtype, scale)
    binary_entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # <= log 2
    assert bool((token_divergence(s, t, "jsd", temperature=T, beta=beta) <= scale * binary_entropy * (1 + 1e-5)).all())
    assert bool((token_divergence(s, t, "tv", temperature=T) <= scale * (1 + 1e-5)).all())
    y = t.argmax(-1)
    for value in (soft_target_kl(t, t.clone(), T), dkd_loss(t, t.clone(), y, temperature=T)[0], logit_mse(t, t.clone()),
                  *(topk_kd_loss(t, t.clone(), k, temperature=T, rest=rest) for rest in ("renormalize", "bucket"))):
        _close(value, 0.0, s.dtype, scale)


@PROPS
@given(logits(), TEMPERATURES)
def test_forward_kl_is_soft_cross_entropy_minus_the_teachers_entropy(pair, T):
    s, t = pair
    log_pt = torch.log_softmax(t / T, -1)
    entropy = -torch.where(log_pt.exp() != 0, log_pt.exp() * log_pt, 0.0).sum(-1)
    kl = soft_target_kl(s, t, T, reduction="none")
    ce = soft_target_cross_entropy(s, t, T, reduction="none")
    scale = float(ce.abs().max())
    _close(kl, ce - T * T * entropy, s.dtype, scale)
    # the per-token forward KL is the same soft-target KL
    _close(token_divergence(s, t, "forward_kl", temperature=T), kl, s.dtype, scale)
    # with every class kept, top-k distillation is the plain KL under either policy
    for rest in ("renormalize", "bucket"):
        _close(topk_kd_loss(s, t, s.shape[1], temperature=T, rest=rest), soft_target_kl(s, t, T), s.dtype, scale)


@PROPS
@given(logits(rows=(1, 1)), TEMPERATURES, st.data())
def test_dkd_parts_recompose_the_kl(pair, T, data):
    """Zhao et al. 2022, Eq. 5 (times T²): KL(p_t || p_s) = TCKD + (1 - p_t,g)·NCKD, for one row of target g."""
    s, t = pair
    g = data.draw(st.integers(0, s.shape[1] - 1))
    _, parts = dkd_loss(s, t, torch.tensor([g]), temperature=T)
    p_tg = float(torch.softmax(t.double() / T, -1)[0, g])
    kl = soft_target_kl(s, t, T)
    _close(parts["tckd"] + (1 - p_tg) * parts["nckd"], kl, s.dtype, float(kl.abs()) + float(parts["nckd"].abs()))


@PROPS
@given(logits(rows=(1, 9)), TEMPERATURES, st.sampled_from(KINDS), st.integers(1, 4), st.data())
def test_chunked_and_fused_equal_the_plain_sums_in_values_and_gradients(pair, T, kind, chunk, data):
    s, t = (x.double() for x in pair)  # the identity is exact in float64
    n, v = s.shape
    y = _labels(data.draw, n, v)
    w = torch.rand(n, dtype=torch.float64)
    options = dict(kind=kind, temperature=T, beta=0.3, alpha=0.2, soft_weights=w, hard_weights=0.5)

    def run(chunk_size):
        x = s.clone().requires_grad_()
        sums = chunked_loss_sums(x, t, y, chunk_size=chunk_size, **options)
        sums.total.backward()
        return sums, x.grad

    (plain, g_plain), (chunked, g_chunked) = run(None), run(chunk)
    scale = float(plain.total.detach().abs()) + T * T
    for a, b in zip(plain, chunked):
        _close(a.detach(), b.detach(), torch.float64, scale)
    _close(g_plain, g_chunked, torch.float64, scale)
    # fused: the logits made from hidden states and an output projection, never as a whole
    d = 3
    h = torch.randn(n, d, dtype=torch.float64)
    weight, bias = torch.randn(v, d, dtype=torch.float64), torch.randn(v, dtype=torch.float64)
    th = torch.randn(n, d, dtype=torch.float64)
    student_logits = h @ weight.T + bias
    fused = fused_loss_sums(h, weight, bias, th, weight.flip(0), None, y, chunk_size=chunk, **options)
    want = chunked_loss_sums(student_logits, th @ weight.flip(0).T, y, chunk_size=None, **options)
    _close(fused.total, want.total.detach(), torch.float64, float(want.total.abs()) + T * T)


# ---------------------------------------------------------------- a NaN is never silent


def _teacher_side_losses(s, t, y, T):
    """Every loss of logits, as a function of (student, teacher) logits [N, C]."""
    k = max(1, t.shape[1] - 1)
    yield from (
        lambda a, b: soft_target_kl(a, b, T), lambda a, b: soft_target_cross_entropy(a, b, T),
        lambda a, b: logit_mse(a, b), lambda a, b: kd_loss(a, b, y, temperature=T)[0],
        lambda a, b: dkd_loss(a, b, y, temperature=T)[0], lambda a, b: topk_kd_loss(a, b, k, temperature=T),
        lambda a, b: topk_kd_loss(a, b, k, temperature=T, rest="bucket"),
        lambda a, b: mutual_loss([a, a.flip(0)], y, temperature=T, teacher_logits=b)[0],
        lambda a, b: sobolev_loss(a, b), lambda a, b: hint_loss(a, b),
        lambda a, b: chunked_loss_sums(a, b, None, chunk_size=2, temperature=T).total,
        *(lambda a, b, kind=kind: token_divergence(a, b, kind, temperature=T) for kind in KINDS),
    )


@PROPS
@given(logits(rows=(2, 4), classes=(3, 6)), TEMPERATURES, st.sampled_from([math.nan, math.inf, -math.inf]), st.data())
def test_a_non_finite_teacher_raises_and_a_non_finite_student_shows_in_the_loss(pair, T, bad, data):
    """No loss is finite with NaN gradients: a teacher's NaN or ±inf raises NonFiniteError (a -inf, a class of
    probability 0, may pass where soft targets allow it: then values and gradients are finite); a student's NaN
    raises, makes the loss non-finite, or (a class the loss does not read) leaves values and gradients finite."""
    from distill.errors import NonFiniteError

    s, t = pair
    n, c = s.shape
    y = t.argmax(-1)
    row, col = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, c - 1))
    poisoned, student = t.clone(), s.clone()
    poisoned[row, col], student[row, col] = bad, math.nan
    for loss in _teacher_side_losses(s, t, y, T):
        try:
            _finite_with_grad(loss, s, poisoned)
            assert bad == -math.inf, "a teacher's NaN or +inf passed"
        except NonFiniteError:
            pass
        try:
            value = loss(student.clone().requires_grad_(), t)
        except NonFiniteError:
            continue
        if bool(torch.isfinite(value).all()):
            _finite_with_grad(loss, student, t)


# ---------------------------------------------------------------- regressions: what the properties found


def test_topk_bucket_of_identical_saturated_logits_is_zero():
    """The teacher's rest (1 - its top-k mass) rounded to ~1e-3 instead of exp(-1e4), and was compared with the
    student's exact rest: identical student and teacher gave 0.53 (float32, T = 1), with gradients to match."""
    t = torch.zeros(4, 6)
    t[3, 4:] = 1e4
    s = t.clone().requires_grad_()
    loss = topk_kd_loss(s, t, 2, rest="bucket")
    loss.backward()
    assert abs(float(loss.detach())) < 1e-3 and float(s.grad.abs().max()) < 1e-3
    # from a cache's stored logsumexp, with every class kept: no rest bucket, so the stored value is not needed
    from distill.losses.topk import topk_kd_loss_from_indices

    values, idx = t.topk(6, dim=-1)
    wrong_by_rounding = torch.logsumexp(t, -1) + 1e-3
    full = topk_kd_loss_from_indices(t, values, idx, rest="bucket", teacher_logsumexp=wrong_by_rounding)
    assert abs(float(full)) < 1e-6


def test_a_teacher_that_requires_grad_gets_finite_gradients_at_minus_inf_and_empty_rest():
    t = torch.tensor([[float("-inf"), 0.0, 1.0], [0.0, 100.0, 0.0]], requires_grad=True)
    s = torch.randn(2, 3, requires_grad=True)
    for loss in (soft_target_kl(s, t, 1.0), soft_target_cross_entropy(s, t, 1.0),
                 dkd_loss(s, t, torch.tensor([1, 1]))[0], topk_kd_loss(s, t, 1, rest="bucket", temperature=0.01),
                 token_divergence(s, t, "jsd").sum(), token_divergence(s, t, "skew_kl").sum()):
        s.grad = t.grad = None
        loss.backward()
        assert bool(torch.isfinite(t.grad).all()) and bool(torch.isfinite(s.grad).all()), loss


def test_skew_rkl_closed_form_gradient_stays_finite_for_a_tiny_alpha():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    for alpha in (1e-45, 1e-20, 0.1):
        x = s.clone().requires_grad_()
        token_divergence(x, t, "skew_rkl", temperature=0.01, alpha=alpha).sum().backward()
        _, g = divergence_with_grad(s, t, "skew_rkl", temperature=0.01, alpha=alpha)
        torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-7)


def test_reverse_kl_from_a_topk_cache_names_the_cause():
    from distill.errors import NonFiniteError

    s, t = torch.randn(3, 5), torch.randn(3, 5)
    t[:, 3:] = float("-inf")  # a top-k cache's rows
    for run in (lambda: token_divergence(s, t, "reverse_kl"),
                lambda: chunked_loss_sums(s, t, None, kind="reverse_kl", chunk_size=2)):
        with pytest.raises(NonFiniteError, match="teacher_logits hold -inf .* reverse_kl is infinite: use forward_kl"):
            run()
