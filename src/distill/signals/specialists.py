"""A generalist plus specialists as one teacher (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
Neural Network", §5 "Training ensembles of specialists on very big datasets").

Each specialist m is trained on one set S_m of classes the generalist confuses, plus a "dustbin" output for
every other class. Class sets come from clustering the covariance of the generalist's predictions (§5.3,
"Assigning classes to specialists"); a specialist is trained on data enriched with its classes, starting
from the generalist's weights (§5.2, "Specialist models"); at inference the generalist and the specialists
that cover its top classes are combined into one full distribution q (§5.4, "Performing inference with
ensembles of specialists"). `GeneralistWithSpecialists(x)` returns log q, so it goes wherever a teacher goes.
"""

import logging
import numbers
import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from distill.data import ArrayDataset, DataSplits
from distill.errors import UserError

log = logging.getLogger("distill")

UNLABELLED = -1


def check_class_sets(class_sets, num_classes: int) -> list[list[int]]:
    """Sorted copies of `class_sets` after checking that they can define specialists over `num_classes` classes:
    at least one set, each non-empty, of integer classes in 0..num_classes-1 without repeats, no class in two
    sets (the combination of §5.4 assumes disjoint sets), and no set holding every class (nothing would be
    left for the dustbin)."""
    if isinstance(class_sets, (str, bytes)) or not isinstance(class_sets, Sequence) or len(class_sets) < 1:
        raise UserError(f"class_sets must be a non-empty list of class lists, got {class_sets!r}: give e.g. [[3, 5, 8], [4, 9]]")
    owner: dict[int, int] = {}
    checked = []
    for i, raw in enumerate(class_sets):
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or len(raw) == 0:
            raise UserError(f"class set {i} ({raw!r}) is empty or not a list: give each specialist a list of at least one class")
        classes = []
        for c in raw:
            if isinstance(c, bool) or not isinstance(c, (numbers.Integral, np.integer)):
                raise UserError(f"class set {i} {list(raw)} holds {c!r}, which is not a class index: use integers 0..{num_classes - 1}")
            c = operator.index(c)
            if not 0 <= c < num_classes:
                raise UserError(f"class set {i} {list(raw)} holds class {c}, outside 0..{num_classes - 1}: remove it or fix the class index")
            classes.append(c)
        if len(set(classes)) != len(classes):
            raise UserError(f"class set {i} {classes} lists a class twice: list each class once")
        if len(classes) == num_classes:
            raise UserError(f"class set {i} holds all {num_classes} classes, leaving none for the dustbin: drop some classes from it")
        for c in classes:
            if c in owner:
                raise UserError(f"class {c} is in class set {owner[c]} and class set {i}: class sets must not overlap, remove it from one")
            owner[c] = i
        checked.append(sorted(classes))
    return checked


def find_class_sets(generalist_probs: Tensor, n_sets: int, seed: int = 0) -> list[list[int]]:
    """Class sets for specialists by clustering the covariance of the generalist's predictions (Hinton et al.
    2015, §5.3): classes that are often predicted together get one specialist.

    With P the (N, C) predicted probabilities, Σ = cov(P) is C×C (covariance over the N rows); its columns
    (one C-vector per class) are clustered with k-means (sklearn KMeans, n_init=10, random_state=seed) into
    n_sets clusters. Two classes the generalist confuses rise and fall together across rows, so their
    columns of Σ are close.
    Singleton clusters are dropped: a class the generalist does not confuse with any other gains nothing
    from a specialist (the specialist would only re-learn "this class or not"), and each specialist costs a
    full forward pass per teacher call. So n_sets must be in 2..C-1 (one cluster would hold every class,
    C clusters are all singletons), and fewer than n_sets sets may come back; sets are sorted, and listed in
    the order of their smallest class.
    For a confident generalist pass softened probabilities, softmax(logits / T) with T around 4: with
    near one-hot predictions each column is dominated by its class's own variance and the clusters say
    little (on sklearn digits, T = 1 puts 6-8 classes in one set; T = 4 gives {1,2,8}, {3,5,9}, {4,7}).
    """
    from sklearn.cluster import KMeans

    probs = torch.as_tensor(generalist_probs)
    if probs.dim() != 2 or probs.shape[0] < 2:
        raise UserError(f"generalist_probs must be (rows, classes) with at least 2 rows, got shape {tuple(probs.shape)}")
    num_classes = probs.shape[1]
    if isinstance(n_sets, bool) or not isinstance(n_sets, numbers.Integral) or not 2 <= n_sets <= num_classes - 1:
        raise UserError(f"n_sets must be an integer from 2 to {num_classes - 1} (classes - 1) for {num_classes} classes, "
                        f"got {n_sets!r}: one cluster would hold every class and {num_classes} would all be singletons")
    p = probs.detach().cpu().double().numpy()
    if not np.isfinite(p).all():
        raise UserError("generalist_probs holds NaN or infinite values: pass softmax probabilities of the generalist")
    covariance = np.cov(p, rowvar=False)  # (C, C); column c describes how class c co-varies with every class
    labels = KMeans(n_clusters=int(n_sets), n_init=10, random_state=seed).fit_predict(covariance)
    clusters = [sorted(np.flatnonzero(labels == k).tolist()) for k in np.unique(labels)]
    # at most C - 1 clusters of C classes: at least one has two classes, so something is always left
    return sorted((c for c in clusters if len(c) > 1), key=lambda c: c[0])


def _sorted_classes(class_set) -> list[int]:
    classes = sorted(operator.index(c) for c in class_set)
    if len(set(classes)) != len(classes) or not classes:
        raise UserError(f"class set {list(class_set)} is empty or lists a class twice: list each class once")
    return classes


def specialist_targets(y: Tensor, class_set) -> Tensor:
    """Labels for specialist S: class S[k] -> k (S sorted), any other class -> |S| (the dustbin), -1 stays -1."""
    classes = _sorted_classes(class_set)
    out = torch.full_like(y, len(classes))
    for k, c in enumerate(classes):
        out[y == c] = k
    out[y == UNLABELLED] = UNLABELLED
    return out


def specialist_training_set(dataset: ArrayDataset, class_set, seed: int, special_share: float = 0.5) -> ArrayDataset:
    """A specialist's training set (Hinton et al. 2015, §5.2): every labelled row of its classes, plus rows drawn
    at random (without replacement, seeded) from the other labelled rows, so that about `special_share` of the
    rows are special; labels are mapped with specialist_targets (others -> dustbin).

    Unlabelled rows are left out: their class may be in the set, so they cannot take the dustbin label, and
    with label -1 they would not train anything. If the other rows run out, all of them are used (the share
    of special rows is then higher than asked).
    """
    if not 0 < special_share < 1:
        raise UserError(f"special_share must be between 0 and 1 (exclusive), got {special_share!r}: e.g. 0.5 as in Hinton et al.")
    targets = specialist_targets(dataset.y, class_set)
    dustbin = len(_sorted_classes(class_set))
    special = torch.nonzero((targets >= 0) & (targets < dustbin)).flatten()
    others = torch.nonzero(targets == dustbin).flatten()
    if len(special) == 0:
        raise UserError(f"no labelled training row belongs to class set {sorted(class_set)}: choose classes present in the data")
    wanted = round(len(special) * (1 - special_share) / special_share)
    generator = torch.Generator().manual_seed(int(seed))
    drawn = others[torch.randperm(len(others), generator=generator)[: min(wanted, len(others))]]
    rows = torch.cat([special, drawn]).sort().values  # data order does not matter (fit shuffles); sorted is tidy
    return ArrayDataset(dataset.x[rows], targets[rows])


def _combine_setup(generalist_logits: Tensor, specialist_logits: list[Tensor], class_sets, top_n: int):
    """Checks shared by combine and specialist_objective; returns (sorted sets, owner (C,): each class's set or -1,
    active (B, M): whether specialist m is active in row b)."""
    if generalist_logits.dim() != 2:
        raise UserError(f"generalist logits must be (batch, classes), got shape {tuple(generalist_logits.shape)}")
    batch, num_classes = generalist_logits.shape
    sets = check_class_sets(class_sets, num_classes)
    if len(specialist_logits) != len(sets):
        raise UserError(f"{len(specialist_logits)} specialist outputs for {len(sets)} class sets: give one specialist per class set")
    for m, (logits, classes) in enumerate(zip(specialist_logits, sets)):
        if tuple(logits.shape) != (batch, len(classes) + 1):
            raise UserError(f"specialist {m} (classes {classes}) gave output shape {tuple(logits.shape)}, expected "
                            f"({batch}, {len(classes) + 1}): one output per class of its set plus one for the dustbin")
    owner, active = _active_specialists(generalist_logits, sets, top_n)
    return sets, owner, active


def _active_specialists(generalist_logits: Tensor, sets: list[list[int]], top_n: int) -> tuple[Tensor, Tensor]:
    """owner (C,): each class's set or -1; active (B, M): whether set m holds one of row b's top_n classes."""
    num_classes = generalist_logits.shape[-1]
    if isinstance(top_n, bool) or not isinstance(top_n, numbers.Integral) or not 1 <= top_n <= num_classes:
        raise UserError(f"top_n must be an integer from 1 to {num_classes}, got {top_n!r}")
    device = generalist_logits.device
    owner = torch.full((num_classes,), -1, dtype=torch.long, device=device)
    for m, classes in enumerate(sets):
        owner[torch.tensor(classes, device=device)] = m
    top_sets = owner[generalist_logits.topk(int(top_n), dim=-1).indices]  # (B, top_n)
    return owner, (top_sets[:, :, None] == torch.arange(len(sets), device=device)).any(1)


def _direct_masses(log_pg: Tensor, specialist_logits: list[Tensor], sets, active: Tensor):
    """log w (B, C): the mass each class gets directly (p_g, plus p_m on S_m for active m), and
    b (B, M): each active specialist's dustbin mass (0 for inactive ones)."""
    log_w = log_pg.clone()
    b = torch.zeros(active.shape, dtype=log_pg.dtype, device=log_pg.device)
    for m, (logits, classes) in enumerate(zip(specialist_logits, sets)):
        log_pm = torch.log_softmax(logits.to(log_pg.dtype), dim=-1)
        on = active[:, m : m + 1]
        cols = torch.tensor(classes, device=log_pg.device)
        log_w[:, cols] = torch.where(on, torch.logaddexp(log_pg[:, cols], log_pm[:, :-1]), log_pg[:, cols])
        b[:, m] = torch.where(on[:, 0], log_pm[:, -1].exp(), 0.0)
    return log_w, b


def _block_terms(lam: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(T, 1 − T, dT/dλ) for blocks with masses W and dustbin masses b at multiplier λ, where T in (0, 1] is the
    root of W/T − b/(1−T) = λ: T = 2W / d, d = a + r, a = λ + W + b, r = sqrt(a² − 4λW).
    Written so that nothing cancels for any λ, as confident networks put W and b near 0 or 1:
    r² = e² + 4Wb with e = λ − W + b; d = −4λW / (r − a) when a < 0; 1 − T = (e + r) / d, with
    e + r = 4Wb / (r − e) when e < 0; dd/dλ = 1 + e / r, so dT/dλ = −2W (e + r) / (r d²)."""
    e = lam - W + b
    r = torch.sqrt(e * e + 4 * W * b)
    a = lam + W + b
    d = torch.where(a >= 0, a + r, -4 * lam * W / (r - a))
    e_plus_r = torch.where(e >= 0, e + r, 4 * W * b / (r - e))
    return 2 * W / d, e_plus_r / d, -2 * W * e_plus_r / (r * d * d)


def _solve_block_totals(W: Tensor, b: Tensor, on: Tensor, one_active: Tensor, steps: int, tol: float) -> Tensor:
    """Block totals T (B, K) with Σ_k T_k = 1 and W_k/T_k − b_k/(1 − T_k) = λ for every block in use (`on`);
    the last block is R (b = 0). Newton's method on λ per row, kept inside a bracket (see combine)."""
    # Σ T >= 1 at lo: at λ = 2(W_k − b_k) block k has T_k = 1/2, so at their minimum every T_k >= 1/2 (there are
    # >= 2 blocks), and a block without dustbin term has T = 1 at λ = W. Σ T <= 1 at hi: T_k <= W_k / λ there.
    lo = torch.where(on, 2 * (W - b), torch.inf).min(1).values
    lo = torch.maximum(lo, torch.where(on & (b == 0), W, -torch.inf).max(1).values)
    hi = W.sum(1)
    scale = torch.where(on, W + b, torch.inf).min(1).values  # T_k moves by about Δλ / (|λ| + W_k + b_k)
    # With one active specialist the root is known: T_S = W_S / 2, T_R = (W_R + b) / 2, λ = W_R / T_R. With more,
    # start at hi, where every block is on the W_k / λ side of its bend and Newton in 1/λ steps well.
    lam = torch.where(one_active, 2 * W[:, -1] / (W[:, -1] + b.sum(1)), hi).clamp(min=lo, max=hi)
    for _ in range(steps):
        T, rest, dT = (torch.where(on, t, 0.0) for t in _block_terms(lam[:, None], W, b))
        # Σ_k T_k − 1 as Σ_{k ≠ j} T_k − (1 − T_j) for the largest block j: exact even when the other blocks are
        # far below float precision next to 1 (their size then still sets λ, and so their q)
        j = T.argmax(1, keepdim=True)
        excess = T.scatter(1, j, 0.0).sum(1) - rest.gather(1, j)[:, 0]  # falls in λ
        lo = torch.where(excess >= 0, lam, lo)
        hi = torch.where(excess >= 0, hi, lam)
        slope = dT.sum(1)
        # Newton on Σ T = 1 in λ, or, once λ > 0 is certain, in 1/λ: there T_R = W_R / λ is a straight line, so
        # steps stay good when the root is orders of magnitude below the start. A step out of the bracket halves
        # it instead (geometrically when it is positive).
        newton = torch.where(lo > 0, lam / (1 + excess / (lam * slope)), lam - excess / slope)
        middle = torch.where(lo > 0, torch.sqrt(lo * hi), (lo + hi) / 2)
        new = torch.where(excess == 0, lam, torch.where((newton >= lo) & (newton <= hi), newton, middle))
        moved = ((new - lam).abs() / (lam.abs() + scale)).max()
        lam = new
        if moved <= tol:
            break
    return _block_terms(lam[:, None], W, b)[0]


def combine(generalist_logits: Tensor, specialist_logits: list[Tensor], class_sets, top_n: int = 1,
            steps: int = 100, tol: float = 1e-13) -> Tensor:
    """log q (B, C): the generalist and its active specialists as one distribution (Hinton et al. 2015, §5.4).

    For a row, p_g = softmax(generalist logits) over the C classes; specialist m is active when its class set
    S_m holds one of the generalist's top_n classes, and p_m = softmax(its logits) over S_m plus a dustbin.
    With q_m the restriction of q to S_m plus a dustbin holding the rest of q, 1 − T_m (T_m = Σ_{c ∈ S_m} q_c),
    q minimises (the paper's equation; the sets are disjoint)
        F(q) = KL(p_g || q) + Σ_{m active} KL(p_m || q_m)
             = const − Σ_c w_c log q_c − Σ_{m active} b_m log(1 − T_m),
    where b_m = p_m(dustbin) and w_c = p_g,c + p_m,k if c = S_m[k] with m active, else p_g,c.
    In logits z (q = softmax(z)), with n active specialists (so Σ_c w_c + Σ_m b_m = 1 + n), the gradient is
        ∂F/∂z_j = (1 + n) q_j − w_j − q_j Σ_{m active, j ∉ S_m} b_m / (1 − T_m).
    ∇F = 0 is solved directly rather than by descent on z: gradient steps scale with q_j, so classes with tiny q
    (which soft targets at high temperature amplify) barely move, and the fixed-point (EM) form of ∇F = 0,
    q_j ← (w_j + q_j Σ_m ...) / (1 + n), needed ~100 steps for 1e-11 on confident networks that disagree
    (random logits of scale 10, top_n = 3) where the solver below needs ~10.
    F is strictly convex in q on the simplex (p_g > 0), and the dustbin terms only see block totals. Blocks
    k are the active sets S_m and R, the classes in no active set (W_R = Σ_R p_g,c, b_R = 0). Given the
    totals T_k, the rest of F is smallest at q_c = T_k w_c / W_k (W_k = Σ_{c ∈ k} w_c), which leaves a convex
    problem in the T_k on the simplex, with optimality conditions (multiplier λ)
        W_k / T_k − b_k / (1 − T_k) = λ   for every block k,   Σ_k T_k = 1.
    Each left side falls strictly in T_k on (0, 1), so T_k(λ) = 2 W_k / (a_k + sqrt(a_k² − 4 λ W_k)),
    a_k = λ + W_k + b_k, is its one root there, falling in λ; λ is the root of Σ_k T_k(λ) = 1, found per row
    by safeguarded Newton (_solve_block_totals) until λ moves by less than tol (relative) or after `steps`.
    With one active specialist (always the case for top_n = 1) the solution is closed-form,
    q_c = w_c / 2 on S and q_c = p_g,c (W_R + b) / (2 W_R) on R, and the solver starts there; with several it
    takes about 5-20 steps. Rows with no active specialist return log p_g unchanged.
    Computed in float64 and in log space, returned in the logits' dtype.
    """
    sets, owner, active = _combine_setup(generalist_logits, specialist_logits, class_sets, top_n)
    log_pg_out = torch.log_softmax(generalist_logits, dim=-1)
    rows = torch.nonzero(active.any(-1)).flatten()
    if len(rows) == 0:
        return log_pg_out
    num_sets, active = len(sets), active[rows]
    log_pg = torch.log_softmax(generalist_logits[rows].double(), dim=-1)
    log_w, b = _direct_masses(log_pg, [s[rows] for s in specialist_logits], sets, active)

    # block of each (row, class): its set if that set is active in the row, else R (index num_sets)
    owner = owner.expand_as(log_w)
    row_index = torch.arange(len(rows), device=owner.device)[:, None]
    block = torch.where((owner >= 0) & active[row_index, owner.clamp_min(0)], owner, num_sets)
    zeros = torch.zeros(len(rows), num_sets + 1, dtype=log_w.dtype, device=log_w.device)
    on = zeros.scatter_add(1, block, torch.ones_like(log_w)) > 0  # blocks holding at least one class
    W = zeros.scatter_add(1, block, log_w.exp())
    W = torch.where(on, W.clamp_min(1e-300), 0.0)  # a block's mass may underflow; keep T = 2W/d off 0/0
    b = torch.cat([b, zeros[:, :1]], dim=1)  # R has no dustbin term
    T = _solve_block_totals(W, b, on, active.sum(1) == 1, steps, tol)
    log_q = log_w + (torch.log(T) - torch.log(W)).gather(1, block)  # q_c = T_k w_c / W_k
    log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)  # sums to 1 within rounding already
    out = log_pg_out.clone()
    out[rows] = log_q.to(out.dtype)
    return out


def specialist_objective(log_q: Tensor, generalist_logits: Tensor, specialist_logits: list[Tensor], class_sets,
                         top_n: int = 1) -> Tensor:
    """F(q) per row (B,), the objective combine minimises: KL(p_g || q) + Σ_{m active} KL(p_m || q_m),
    written directly from the KL definitions. For checking convergence and comparing solutions."""
    sets, _, active = _combine_setup(generalist_logits, specialist_logits, class_sets, top_n)
    log_q = log_q.double()
    log_pg = torch.log_softmax(generalist_logits.double(), dim=-1)
    total = (log_pg.exp() * (log_pg - log_q)).sum(-1)
    for m, (logits, classes) in enumerate(zip(specialist_logits, sets)):
        log_pm = torch.log_softmax(logits.double(), dim=-1)
        rest = [c for c in range(log_q.shape[1]) if c not in classes]
        log_qm = torch.cat([log_q[:, classes], torch.logsumexp(log_q[:, rest], dim=-1, keepdim=True)], dim=-1)
        total = total + torch.where(active[:, m], (log_pm.exp() * (log_pm - log_qm)).sum(-1), 0.0)
    return total


class GeneralistWithSpecialists(nn.Module):
    """A generalist and its specialists as one teacher: forward(x) = combine(...) = log q, so softmax of the
    output is q (Hinton et al. 2015, §5.4) and it can stand wherever a teacher's logits are expected.
    Specialist m's output k belongs to the k-th smallest class of its set, its last output to the dustbin.
    Each specialist runs only on the rows where it is active (with top_n = 1 that is one specialist per row),
    so the cost is about one generalist plus one specialist forward per row, whatever the number of sets."""

    def __init__(self, generalist: nn.Module, specialists: list[nn.Module], class_sets, top_n: int = 1):
        super().__init__()
        if len(specialists) != len(class_sets):
            raise UserError(f"{len(specialists)} specialists for {len(class_sets)} class sets: give one specialist per class set")
        self.generalist = generalist
        self.specialists = nn.ModuleList(specialists)
        self.class_sets = [list(s) for s in class_sets]  # checked against the generalist's class count in forward
        self.top_n = top_n

    def extra_repr(self) -> str:
        return f"class_sets={self.class_sets}, top_n={self.top_n}"  # part of its identity (e.g. a cache's teacher hash)

    def forward(self, x: Tensor) -> Tensor:
        generalist_logits = self.generalist(x)
        sets = check_class_sets(self.class_sets, generalist_logits.shape[-1])
        _, active = _active_specialists(generalist_logits, sets, self.top_n)
        outputs = []
        for m, (specialist, classes) in enumerate(zip(self.specialists, sets)):
            rows = torch.nonzero(active[:, m]).flatten()
            # rows where the specialist is inactive are ignored by combine: zeros stand in for them
            out = generalist_logits.new_zeros(len(generalist_logits), len(classes) + 1)
            if len(rows) > 0:
                logits = specialist(x[rows])
                if tuple(logits.shape) != (len(rows), len(classes) + 1):
                    raise UserError(f"specialist {m} (classes {classes}) gave output shape {tuple(logits.shape)} for "
                                    f"{len(rows)} rows; it needs {len(classes) + 1} outputs per row: one per class of "
                                    "its set plus one for the dustbin")
                out[rows] = logits.to(out.dtype)
            outputs.append(out)
        return combine(generalist_logits, outputs, sets, self.top_n)


def copy_matching_weights(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy every state-dict entry (parameters and buffers such as batch-norm statistics) of `source` into
    `target` where name and shape match; return the copied names. A specialist built like the generalist
    but for |S|+1 outputs takes everything except its last layer (Hinton et al. 2015, §5.2 initialise each
    specialist with the generalist's weights)."""
    wanted = target.state_dict()
    taken = {k: v for k, v in source.state_dict().items() if k in wanted and wanted[k].shape == v.shape}
    target.load_state_dict(taken, strict=False)
    return sorted(taken)


def correct_dustbin_prior(model: nn.Module, num_outputs: int, special_share_train: float, special_share_data: float) -> float:
    """Undo the over-sampling of a specialist's classes (Hinton et al. 2015, §5.2: "incrementing the logit of
    the dust-bin class by the log of the proportion by which the specialist class is oversampled").

    Trained with prior s on S and 1 - s on the dustbin, where the data has π and 1 - π, Bayes' rule gives
    p(k|x) ∝ p_train(k|x) · prior(k) / train_prior(k); as softmax ignores a common shift, this is adding
        δ = log( (s / π) / ((1 - s) / (1 - π)) )
    to the dustbin logit. Done on the bias of the model's last nn.Linear with `num_outputs` outputs, so the
    model's architecture and state-dict keys stay those that `build` made. Returns δ.
    """
    s, p = special_share_train, special_share_data
    shift = float(np.log(s / p) - np.log((1 - s) / (1 - p)))
    heads = [mod for mod in model.modules() if isinstance(mod, nn.Linear) and mod.out_features == num_outputs and mod.bias is not None]
    if not heads:
        raise UserError(f"the specialist model has no final nn.Linear with bias and {num_outputs} outputs to correct "
                        "for over-sampling: build the model with one, or pass prior_correction=False")
    with torch.no_grad():
        heads[-1].bias[-1] += shift
    return shift


def train_specialists(generalist: nn.Module, data: DataSplits, class_sets, build: Callable[[int], nn.Module], train_cfg, *,
                      seed: int = 0, accelerator=None, progress: bool = False, special_share: float = 0.5,
                      prior_correction: bool = True) -> list[nn.Module]:
    """One trained specialist per class set (Hinton et al. 2015, §5.2), in eval mode: train_specialist for each."""
    sets = check_class_sets(class_sets, data.num_classes)
    return [train_specialist(generalist, data, classes, m, build, train_cfg, seed=seed, accelerator=accelerator,
                             progress=progress, special_share=special_share, prior_correction=prior_correction)
            for m, classes in enumerate(sets)]


def train_specialist(generalist: nn.Module, data: DataSplits, classes: list[int], index: int,
                     build: Callable[[int], nn.Module], train_cfg, *, seed: int = 0, accelerator=None,
                     progress: bool = False, special_share: float = 0.5, prior_correction: bool = True,
                     state_dir=None, resume: bool = False) -> nn.Module:
    """The specialist for class set `classes` (the `index`-th set), trained, in eval mode.

    model = build(|S| + 1), initialised from the generalist where parameter names and shapes match
    (copy_matching_weights: with the same architecture that is all but the output layer); trained with
    cross-entropy (Supervised) on specialist_training_set(data.train, S, seed, special_share), choosing the
    best epoch on data.val mapped by specialist_targets (no validation if data.val is empty); then, with
    prior_correction, its dustbin logit is raised by the log odds of the over-sampling (correct_dustbin_prior)
    so its probabilities refer to the data's class frequencies, as the combination of §5.4 assumes.
    state_dir / resume: a resumable training checkpoint, as in distill.train.fit.
    """
    from distill.methods.supervised import Supervised, SupervisedConfig
    from distill.train import fit

    with torch.random.fork_rng(devices=[]):  # the new output layer's initial weights depend on seed alone
        torch.manual_seed(seed * 7919 + index)
        model = build(len(classes) + 1)
    copied = copy_matching_weights(generalist, model)
    log.info("specialist %d %s: %d weight tensors copied from the generalist", index, classes, len(copied))
    train_set = specialist_training_set(data.train, classes, seed, special_share)
    val_set = None
    if len(data.val) > 0:
        val_set = ArrayDataset(data.val.x, specialist_targets(data.val.y, classes))
    fit(model, Supervised(SupervisedConfig()), train_set, val_set, train_cfg, seed=seed, accelerator=accelerator,
        progress=progress, desc=f"specialist {index}", state_dir=state_dir, resume=resume)
    if prior_correction:
        labelled = data.train.y[data.train.y != UNLABELLED]
        share_train = float((train_set.y < len(classes)).double().mean())
        share_data = float(torch.isin(labelled, torch.tensor(classes)).double().mean())
        if share_data < 1:  # a set that holds every labelled row's class has no dustbin rows to re-weigh
            correct_dustbin_prior(model, len(classes) + 1, share_train, share_data)
    return model.eval()
