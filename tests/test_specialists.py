"""Generalist + specialists (Hinton et al. 2015, §5): class-set checks and clustering, specialist data, the §5.4
combination against scipy and closed forms, and specialists that train on digits and teach a student."""

import numpy as np
import pytest
import torch
from conftest import train_student
from scipy.optimize import minimize

from distill.data import ArrayDataset
from distill.errors import UserError
from distill.methods.kd import KD, KDConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import TrainConfig
from distill.signals import LiveTeacher
from distill.signals.specialists import (
    GeneralistWithSpecialists,
    check_class_sets,
    combine,
    copy_matching_weights,
    correct_dustbin_prior,
    find_class_sets,
    specialist_objective,
    specialist_targets,
    specialist_training_set,
    train_specialists,
)
from distill.students import build_model
from distill.tasks.classification import evaluate

SETS = [[0, 1, 2], [3, 4], [5, 6, 7]]  # over 10 classes: 8 and 9 belong to no specialist
C = 10


def _random_case(seed, rows, scale, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    generalist = torch.randn(rows, C, generator=g, dtype=dtype) * scale
    specialists = [torch.randn(rows, len(s) + 1, generator=g, dtype=dtype) * scale for s in SETS]
    return generalist, specialists


# --- an independent float64 reference, written from the KL definitions --------------------------------------

def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _active_sets(generalist_row, top_n):
    top = set(np.argsort(-generalist_row)[:top_n].tolist())
    return [m for m, s in enumerate(SETS) if top & set(s)]


def _objective_np(q, generalist_row, specialist_rows, top_n):
    """KL(p_g || q) + Σ_{m active} KL(p_m || q_m), q_m = (q on S_m, Σ of q outside S_m)."""
    pg = _softmax(generalist_row)
    total = np.sum(pg * np.log(pg / q))
    for m in _active_sets(generalist_row, top_n):
        pm = _softmax(specialist_rows[m])
        rest = [c for c in range(C) if c not in SETS[m]]
        qm = np.append(q[SETS[m]], q[rest].sum())
        total += np.sum(pm * np.log(pm / qm))
    return total


def _scipy_solution(generalist_row, specialist_rows, top_n):
    objective = lambda z: _objective_np(_softmax(z), generalist_row, specialist_rows, top_n)
    result = minimize(objective, generalist_row, method="BFGS", options={"gtol": 1e-10, "maxiter": 2000})
    return _softmax(result.x)


# --- class sets ---------------------------------------------------------------------------------------------

def _fixed_point_terms(generalist, specialists, i, q, top_n):
    """Row i's w_j = p_g,j + Σ_m p_m,j (j in S_m) and r_j = Σ_m dustbin_m / Q_m (j outside S_m), active m only."""
    w, r, active = _softmax(generalist[i].numpy()).copy(), np.zeros(C), _active_sets(generalist[i].numpy(), top_n)
    for m in active:
        pm = _softmax(specialists[m][i].numpy())
        w[SETS[m]] += pm[:-1]
        rest = [c for c in range(C) if c not in SETS[m]]
        r[rest] += pm[-1] / q[rest].sum()
    return w, r, active


def test_check_class_sets_returns_sorted_copies():
    given = [[7, 5], [2, 0, 1]]
    assert check_class_sets(given, 10) == [[5, 7], [0, 1, 2]]
    assert given == [[7, 5], [2, 0, 1]]  # not sorted in place
    assert check_class_sets([[np.int64(3), 4]], 5) == [[3, 4]]


@pytest.mark.parametrize("sets, match", [
    ([], "non-empty list"),
    ([[0, 1], []], "class set 1 .* empty"),
    ([[0, 10]], "class set 0 .* class 10, outside 0..9"),
    ([[-1, 2]], "class -1, outside 0..9"),
    ([[0, 1], [1, 2]], "class 1 is in class set 0 and class set 1"),
    ([list(range(10))], "all 10 classes, leaving none for the dustbin"),
    ([[3, 3, 4]], "lists a class twice"),
    ([[1.5, 2]], "not a class index"),
    ([[True, 2]], "not a class index"),
    ("01", "non-empty list"),
])
def test_check_class_sets_refuses_bad_sets(sets, match):
    with pytest.raises(UserError, match=match) as caught:
        check_class_sets(sets, 10)
    assert "\n" not in str(caught.value)


def test_find_class_sets_groups_the_classes_the_generalist_confuses():
    """6 classes; the generalist splits its belief between 0 and 1, and between 2 and 3, but is sure of 4, 5."""
    rng = np.random.default_rng(0)
    rows = []
    for true in rng.integers(0, 6, size=600):
        p = np.full(6, 0.01)
        if true < 4:
            pair = [0, 1] if true < 2 else [2, 3]
            share = rng.uniform(0.2, 0.8)
            p[pair] += [share * 0.94, (1 - share) * 0.94]
        else:
            p[true] += 0.94
        rows.append(p / p.sum())
    probs = torch.tensor(np.array(rows))
    assert find_class_sets(probs, 4) == [[0, 1], [2, 3]]  # {4} and {5} come out as singletons: dropped
    assert find_class_sets(probs, 4, seed=3) == [[0, 1], [2, 3]]
    for bad in (1, 6, 7, 0):
        with pytest.raises(UserError, match="n_sets must be an integer from 2 to 5"):
            find_class_sets(probs, bad)
    with pytest.raises(UserError, match="rows, classes"):
        find_class_sets(probs[0], 2)


# --- specialist data ----------------------------------------------------------------------------------------

def test_specialist_targets_map_set_classes_dustbin_and_unlabelled():
    y = torch.tensor([0, 3, 5, 7, -1, 3, 9])
    expected = [{3: 0, 5: 1, 7: 2}.get(int(v), 3) if v >= 0 else -1 for v in y]  # the set sorted: 3, 5, 7
    assert specialist_targets(y, [7, 3, 5]).tolist() == [3, 0, 1, 2, -1, 0, 3]
    assert specialist_targets(y, [7, 3, 5]).tolist() == expected
    with pytest.raises(UserError, match="twice"):
        specialist_targets(y, [3, 3])


def test_specialist_training_set_is_half_special_and_seeded():
    y = torch.arange(200) % 10
    y[:20] = -1  # unlabelled rows never enter: their class could be in the set
    x = torch.arange(200, dtype=torch.float32)[:, None] * 10 + y[:, None]  # each row remembers its label
    data = ArrayDataset(x, y)
    out = specialist_training_set(data, [2, 7], seed=0)
    original = (out.x[:, 0] % 10).long()
    special = torch.isin(original, torch.tensor([2, 7]))
    assert int(special.sum()) == int(torch.isin(y, torch.tensor([2, 7])).sum()) == 36  # every special row
    assert int((~special).sum()) == 36  # as many others: special_share 0.5
    assert torch.equal(out.y, specialist_targets(original, [2, 7]))
    assert (out.y >= 0).all()
    again, other_seed = specialist_training_set(data, [2, 7], seed=0), specialist_training_set(data, [2, 7], seed=1)
    assert torch.equal(again.x, out.x) and not torch.equal(other_seed.x, out.x)
    quarter = specialist_training_set(data, [2, 7], seed=0, special_share=0.25)
    assert len(quarter) == 36 * 4
    everything = specialist_training_set(data, [2, 7], seed=0, special_share=0.01)  # others run out: all taken
    assert len(everything) == 180
    with pytest.raises(UserError, match="special_share"):
        specialist_training_set(data, [2, 7], seed=0, special_share=1.0)
    with pytest.raises(UserError, match="no labelled training row"):
        specialist_training_set(ArrayDataset(x[:5], torch.tensor([0, 1, 0, 1, -1])), [2], seed=0)


# --- the combination of §5.4 --------------------------------------------------------------------------------

@pytest.mark.parametrize("top_n, scale", [(1, 3.0), (2, 3.0), (3, 6.0), (10, 2.0)])
def test_combine_matches_scipy_on_the_objective(top_n, scale):
    generalist, specialists = _random_case(top_n, 8, scale)
    log_q = combine(generalist, specialists, SETS, top_n=top_n)
    assert log_q.dtype == torch.float64
    for i in range(len(generalist)):
        g_row, s_rows = generalist[i].numpy(), [s[i].numpy() for s in specialists]
        ours, theirs = log_q[i].exp().numpy(), _scipy_solution(g_row, s_rows, top_n)
        assert _objective_np(ours, g_row, s_rows, top_n) <= _objective_np(theirs, g_row, s_rows, top_n) + 1e-12
        np.testing.assert_allclose(ours, theirs, atol=2e-5)
        # and specialist_objective is that same objective
        assert specialist_objective(log_q[i : i + 1], generalist[i : i + 1], [s[i : i + 1] for s in specialists],
                                    SETS, top_n).item() == pytest.approx(_objective_np(ours, g_row, s_rows, top_n), abs=1e-12)


def test_documented_gradient_and_zero_gradient_at_the_solution():
    """∂F/∂z_j = (1+n) q_j − w_j − q_j Σ_{m active, j ∉ S_m} b_m / (1 − T_m), checked against autograd at a random
    z; at combine's answer the gradient vanishes."""
    generalist, specialists = _random_case(5, 16, 4.0)
    top_n = 3
    z = torch.randn(16, C, dtype=torch.float64, requires_grad=True)
    specialist_objective(torch.log_softmax(z, -1), generalist, specialists, SETS, top_n).sum().backward()
    for i in range(16):
        q = _softmax(z[i].detach().numpy())
        w, r, active = _fixed_point_terms(generalist, specialists, i, q, top_n)
        np.testing.assert_allclose(z.grad[i].numpy(), (1 + len(active)) * q - w - q * r, atol=1e-12)
    solution = combine(generalist, specialists, SETS, top_n=top_n).requires_grad_()
    specialist_objective(torch.log_softmax(solution, -1), generalist, specialists, SETS, top_n).sum().backward()
    assert solution.grad.abs().max() < 1e-12


@pytest.mark.parametrize("scale", [4.0, 30.0])
def test_combine_keeps_tiny_probabilities_exact(scale):
    """Optimality as a fixed point, q_j = (w_j + q_j r_j) / (1 + n), holds in relative terms for every class, down
    to probabilities of e^-150 (what soft targets at high temperature magnify)."""
    generalist, specialists = _random_case(7, 40, scale)
    for top_n in (1, 2, 3):
        log_q = combine(generalist, specialists, SETS, top_n=top_n)
        for i in range(40):
            q = log_q[i].exp().numpy()
            w, r, active = _fixed_point_terms(generalist, specialists, i, q, top_n)
            fixed_point = (w + q * r) / (1 + len(active))
            np.testing.assert_allclose(np.log(fixed_point), log_q[i].numpy(), rtol=0, atol=1e-9)


def test_one_active_specialist_has_the_closed_form():
    """With one active set S: q_c = (p_g,c + p_m,c) / 2 on S, and q_c = p_g,c (W_R + b) / (2 W_R) elsewhere."""
    generalist, specialists = _random_case(11, 30, 3.0)
    log_q = combine(generalist, specialists, SETS, top_n=1)
    for i in range(30):
        pg = _softmax(generalist[i].numpy())
        active = _active_sets(generalist[i].numpy(), 1)
        if not active:
            continue
        (m,) = active
        pm = _softmax(specialists[m][i].numpy())
        rest = [c for c in range(C) if c not in SETS[m]]
        expected = pg * (pg[rest].sum() + pm[-1]) / (2 * pg[rest].sum())
        expected[SETS[m]] = (pg[SETS[m]] + pm[:-1]) / 2
        np.testing.assert_allclose(log_q[i].exp().numpy(), expected, rtol=1e-12)


def test_no_active_specialist_gives_the_generalist_exactly():
    generalist, specialists = _random_case(3, 8, 3.0, dtype=torch.float32)
    generalist[:, 8] += 100  # every row's top class is 8, which no specialist covers
    assert torch.equal(combine(generalist, specialists, SETS, top_n=1), torch.log_softmax(generalist, -1))
    generalist[:4, 0] += 200  # rows 0-3 now activate the first specialist; rows 4-7 stay the generalist's
    log_q = combine(generalist, specialists, SETS, top_n=1)
    assert torch.equal(log_q[4:], torch.log_softmax(generalist[4:], -1))
    assert not torch.allclose(log_q[:4], torch.log_softmax(generalist[:4], -1))


@pytest.mark.parametrize("top_n", [1, 2, 4])
def test_specialists_that_agree_with_the_generalist_change_nothing(top_n):
    generalist, _ = _random_case(4, 20, 5.0)
    log_pg = torch.log_softmax(generalist, -1)
    agreeing = []
    for s in SETS:  # p_m = p_g restricted to S plus everything else in the dustbin
        rest = [c for c in range(C) if c not in s]
        agreeing.append(torch.cat([log_pg[:, s], torch.logsumexp(log_pg[:, rest], -1, keepdim=True)], -1))
    torch.testing.assert_close(combine(generalist, agreeing, SETS, top_n=top_n), log_pg, rtol=0, atol=1e-12)


def test_combine_sums_to_one_keeps_dtype_and_runs_under_inference_mode():
    generalist, specialists = _random_case(9, 64, 8.0, dtype=torch.float32)
    with torch.inference_mode():
        log_q = combine(generalist, specialists, SETS, top_n=3)
    assert log_q.dtype == torch.float32 and torch.isfinite(log_q).all()
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(64), rtol=0, atol=1e-6)


def test_combine_refuses_mismatched_specialists():
    generalist, specialists = _random_case(1, 4, 1.0)
    with pytest.raises(UserError, match=r"specialist 1 \(classes \[3, 4\]\) gave output shape \(4, 2\), expected \(4, 3\)"):
        combine(generalist, [specialists[0], specialists[1][:, :2], specialists[2]], SETS)
    with pytest.raises(UserError, match="2 specialist outputs for 3 class sets"):
        combine(generalist, specialists[:2], SETS)
    with pytest.raises(UserError, match="top_n must be an integer from 1 to 10"):
        combine(generalist, specialists, SETS, top_n=0)


# --- the teacher module and specialist training -------------------------------------------------------------

def test_module_runs_specialists_only_where_needed_and_equals_combine():
    torch.manual_seed(0)
    generalist = torch.nn.Linear(5, C).double()
    specialists = [torch.nn.Linear(5, len(s) + 1).double() for s in SETS]
    x = torch.randn(50, 5, dtype=torch.float64) * 3
    for top_n in (1, 3):
        teacher = GeneralistWithSpecialists(generalist, specialists, SETS, top_n=top_n)
        expected = combine(generalist(x), [s(x) for s in specialists], SETS, top_n=top_n)
        torch.testing.assert_close(teacher(x), expected, rtol=0, atol=1e-12)
    with pytest.raises(UserError, match="2 specialists for 3 class sets"):
        GeneralistWithSpecialists(generalist, specialists[:2], SETS)
    wrong = GeneralistWithSpecialists(generalist, [specialists[0], specialists[0], specialists[2]], SETS, top_n=10)
    with pytest.raises(UserError, match=r"specialist 1 \(classes \[3, 4\]\) gave output shape \(50, 4\)"):
        wrong(x)
    with pytest.raises(UserError, match="class 3 is in class set 0 and class set 1"):
        GeneralistWithSpecialists(generalist, specialists[:2], [[0, 3], [3, 4]])(x)


def test_copy_matching_weights_and_dustbin_prior_correction(digits, digits_teacher):
    specialist = build_model(digits_teacher.config, digits.input_shape, 4)
    copied = copy_matching_weights(digits_teacher, specialist)
    mine, theirs = specialist.state_dict(), digits_teacher.state_dict()
    assert set(theirs) - set(copied) == {"head.4.weight", "head.4.bias"}  # all but the output layer
    assert all(torch.equal(mine[k], theirs[k]) for k in copied)
    assert mine["head.4.weight"].shape == (4, 256)

    # Bayes: p(k|x) ∝ p_train(k|x) · prior(k) / train_prior(k), with special share 0.5 in training, 0.3 in the data
    specialist.eval()
    x = digits.test.x[:20]
    with torch.no_grad():
        before = torch.softmax(specialist(x).double(), -1)
        shift = correct_dustbin_prior(specialist, 4, 0.5, 0.3)
        after = torch.softmax(specialist(x).double(), -1)
    reweighed = before * torch.tensor([0.3 / 0.5] * 3 + [0.7 / 0.5], dtype=torch.float64)
    torch.testing.assert_close(after, reweighed / reweighed.sum(-1, keepdim=True), rtol=1e-5, atol=1e-7)
    assert shift == pytest.approx(np.log(0.5 / 0.3 * 0.7 / 0.5))
    with pytest.raises(UserError, match="prior_correction=False"):
        correct_dustbin_prior(specialist, 5, 0.5, 0.3)


@pytest.fixture(scope="module")
def digits_specialists(digits, digits_teacher):
    """Class sets from the teacher's softened training predictions, and a CNN specialist for each, initialised
    from the teacher (same architecture) and trained for 10 epochs (~3 s at one thread)."""
    with torch.inference_mode():
        probs = torch.softmax(digits_teacher(digits.train.x) / 4, -1)
    sets = find_class_sets(probs, 5)
    build = lambda n: build_model(digits_teacher.config, digits.input_shape, n)
    cfg = TrainConfig(epochs=10, batch_size=64, lr=0.001, jitter=1)
    return sets, train_specialists(digits_teacher, digits, sets, build, cfg, seed=0)


def test_digits_specialists_are_as_accurate_as_the_generalist(digits, digits_teacher, digits_specialists):
    sets, specialists = digits_specialists
    assert 2 <= len(sets) <= 4 and all(len(s) >= 2 for s in sets), sets
    assert all(not s.training for s in specialists)
    assert [s(digits.test.x[:3]).shape[-1] for s in specialists] == [len(s) + 1 for s in sets]
    generalist_errors = evaluate(digits_teacher, digits.test)["errors"]
    combined_errors = evaluate(GeneralistWithSpecialists(digits_teacher, specialists, sets), digits.test)["errors"]
    print(f"\nclass sets {sets}: generalist {generalist_errors} test errors, with specialists {combined_errors}")
    assert combined_errors <= generalist_errors + 1


def test_generalist_with_specialists_teaches_a_better_student(digits, digits_teacher, digits_specialists):
    sets, specialists = digits_specialists
    teacher = LiveTeacher(GeneralistWithSpecialists(digits_teacher, specialists, sets))
    scratch = [train_student(Supervised(SupervisedConfig()), digits, s) for s in (0, 1)]
    distilled = [train_student(KD(KDConfig(temperature=4), teacher), digits, s) for s in (0, 1)]
    print(f"\nscratch {scratch} (sum {sum(scratch)}), KD from generalist+specialists {distilled} (sum {sum(distilled)})")
    assert sum(distilled) < sum(scratch), (distilled, scratch)
