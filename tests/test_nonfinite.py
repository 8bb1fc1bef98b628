"""NaN and inf stop training where they appear: a teacher's outputs (live or cached), a batch's inputs, a loss's
targets. The Python API raises NonFiniteError instead of a finite loss with NaN gradients; the loop and the CLI
name the step, the batch and what held them. Each case has its counter-check: the same code with finite numbers
trains."""

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import poisoned

from distill import Distiller
from distill.errors import NonFiniteError, UserError
from distill.students import CNNConfig, MLPConfig, build_model

SHAPE, CLASSES = (1, 8, 8), 10

# method -> (its params, the models' architecture): every method of the zoo on digits-shaped inputs
METHODS = {
    "kd": ({}, "mlp"),
    "kd-soft_ce": ({"soft_loss": "soft_ce"}, "mlp"),
    "kd-mse": ({"soft_loss": "mse"}, "mlp"),
    "dkd": ({"warmup_epochs": 0}, "mlp"),
    "topk": ({"k": 3}, "mlp"),
    "noisy": ({"p": 1.0}, "mlp"),
    "mutual": ({}, "mlp"),
    "sobolev": ({}, "mlp"),
    "bss": ({}, "mlp"),
    "divergence": ({"divergence": "jsd"}, "mlp"),
    "hints": ({"student_layer": "net.1", "teacher_layer": "net.1"}, "mlp"),
    "attention": ({"student_layers": ["features.1"], "teacher_layers": ["features.1"]}, "cnn"),
}


def _model(arch: str, seed: int, width: int):
    torch.manual_seed(seed)
    cfg = MLPConfig(hidden=[width]) if arch == "mlp" else CNNConfig(channels=[4], hidden=[width])
    return build_model(cfg, SHAPE, CLASSES)


def _batch(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SHAPE), generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _distiller(key: str, teacher):
    params, arch = METHODS[key]
    method = key.split("-")[0]
    params = {**params, **({"soft_loss": key.split("-")[1]} if "-" in key else {})}
    return Distiller(teacher, _model(arch, 1, 16), method, **params)


@pytest.mark.parametrize("key", METHODS)
def test_every_method_refuses_a_nan_teacher_and_trains_with_a_finite_one(key):
    x, y = _batch()
    teacher = _model(METHODS[key][1], 0, 32)
    with pytest.raises(NonFiniteError, match="NaN"):
        _distiller(key, poisoned(teacher)).loss(x, y)
    # counter-check: the same code with a finite teacher gives finite gradients and lowers the loss
    d = _distiller(key, teacher)
    d.setup(x)
    opt = torch.optim.Adam(d.parameters(), lr=0.01)
    losses = []
    for _ in range(5):
        loss, _ = d.loss(x, y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


# the methods that read their teacher through the signal, given as a plain callable (no LiveTeacher check in
# between): the losses themselves must refuse the NaN
SIGNAL_METHODS = ["kd", "kd-soft_ce", "kd-mse", "dkd", "topk", "noisy", "mutual", "divergence"]


@pytest.mark.parametrize("key", SIGNAL_METHODS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_losses_refuse_non_finite_teacher_logits_behind_any_signal(key, value):
    from distill.methods import build_method

    x, y = _batch()
    d = _distiller(key, _model("mlp", 0, 32))
    d.setup(x)
    logits = torch.randn(len(x), CLASSES)
    method = build_method(d.method.config, teacher=lambda inputs: logits)
    method.modules = d.method.modules  # mutual's peers
    loss, _ = method(d.student, x, y)
    loss.backward()  # counter-check: finite logits, finite gradients
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in d.student.parameters())
    logits[5, 3] = value
    with pytest.raises(NonFiniteError, match="teacher"):
        method(d.student, x, y)


def test_language_model_methods_refuse_a_nan_teacher(tmp_path):
    """transformer (hidden states read from the teacher network) and divergence with fused=true (the teacher's
    final hidden states, no logits), on tiny causal LMs."""
    from lm_fixtures import lm_recipe

    from distill.methods import build_method
    from distill.methods.divergence import DivergenceConfig
    from distill.methods.transformer import TransformerConfig
    from distill.recipe import validate_recipe
    from distill.signals import LiveTeacher
    from distill.tasks import make_task

    task = make_task(validate_recipe(lm_recipe(tmp_path)))
    data = task.load_data()
    teacher, student = (task.build_model(role.model, data) for role in (task.recipe.teacher, task.recipe.student))
    inputs, y = data.train.__getitems__([0, 1, 2])
    poisoned = copy.deepcopy(teacher)
    with torch.no_grad():
        poisoned.hf.transformer.ln_f.weight[0] = float("nan")  # the last hidden states, hence the logits
    for cfg in (TransformerConfig(hidden_weight=1.0), DivergenceConfig(fused=True, chunk_size=8)):
        good = build_method(cfg, LiveTeacher(teacher))
        good.setup(student, inputs)
        loss, _ = good(student, inputs, y)
        assert torch.isfinite(loss)
        bad = build_method(cfg, LiveTeacher(poisoned))
        bad.setup(student, inputs)
        with pytest.raises(NonFiniteError, match="teacher.*hold NaN"):
            bad(student, inputs, y)


# ----------------------------------------------------------------------------- the loop: step, batch and which


def _digits_loader(x, y, batch_size=16):
    return DataLoader(list(zip(x, y)), batch_size=batch_size, shuffle=False)  # batches in order


def _fit(method, data, **cfg):
    from distill.recipe import TrainConfig
    from distill.train import fit

    cfg = TrainConfig(**{"epochs": 1, "batch_size": 16, "lr": 0.01, **cfg})
    return fit(_model("mlp", 1, 16), method, data, None, cfg, progress=False)


@pytest.mark.parametrize("grad_accum, where", [(1, "step 3 (epoch 1, batch 3)"), (2, "step 2 (epoch 1, batch 3)")])
def test_nan_inputs_stop_training_at_their_batch(grad_accum, where):
    from distill.methods.kd import KD, KDConfig
    from distill.signals import LiveTeacher

    x, y = _batch(96)
    method = KD(KDConfig(), LiveTeacher(_model("mlp", 0, 32)))
    _fit(method, _digits_loader(x, y), grad_accum=grad_accum)  # counter-check: trains
    x[40, 0, 2, 2] = float("nan")  # in the third batch of 16
    with pytest.raises(UserError) as e:
        _fit(method, _digits_loader(x, y), grad_accum=grad_accum)
    assert str(e.value) == (f"train: {where}: the batch's inputs hold NaN: check the data (a NaN input makes NaN "
                            "outputs and gradients)")


def _cache(tmp_path, teacher, data):
    from distill.signals import open_cache, write_cache

    write_cache(teacher, data, tmp_path / "cache", dtype="float32")
    return open_cache(tmp_path / "cache")


class _PoisonedFrom:
    """A teacher cache whose rows from the n-th read on (the loop reads one batch of rows per read) hold NaN."""

    def __init__(self, cache, n: int, top_k: bool = False):
        self.cache, self.n, self.reads = cache, n, 0
        self.n_rows, self.manifest, self.path = cache.n_rows, cache.manifest, cache.path

    def batch(self, indices):
        self.reads += 1
        logits, extras = self.cache.batch(indices)
        if self.reads >= self.n:
            logits[0, 1] = float("nan")
        return logits, extras


@pytest.mark.parametrize("top_k", [None, 3])
def test_nan_in_cached_logits_stops_training_at_its_batch(tmp_path, digits, top_k):
    from distill.methods.kd import KD, KDConfig
    from distill.signals import CachedDataset, CachedTeacher, open_cache
    from distill.data.arrays import ArrayDataset

    data = ArrayDataset(digits.train.x[:64], digits.train.y[:64])
    cache = _cache(tmp_path, _model("mlp", 0, 32), data)
    if top_k:
        cache = open_cache(tmp_path / "cache", top_k=top_k)  # logits -inf outside the top k: no NaN, trains
    method = KD(KDConfig(), CachedTeacher())
    _fit(method, CachedDataset(data, cache))  # counter-check
    # read 1 is the loop's look at the first batch (method.setup), reads 2.. are batches 1..: NaN from batch 3 on
    with pytest.raises(UserError, match=r"^train: step 3 \(epoch 1, batch 3\): the cached teacher logits hold NaN: "
                                        r"write the teacher cache again"):
        _fit(method, CachedDataset(data, _PoisonedFrom(cache, 4)))


# ----------------------------------------------------------------------------- the CLI: one line, exit 2


@pytest.fixture(scope="module")
def cli_teachers(tmp_path_factory):
    """(recipe, a teacher trained by `distill train`, the same teacher with a NaN bias), epochs cut to 1."""
    from conftest import teachers_finite_and_nan

    return teachers_finite_and_nan(tmp_path_factory.mktemp("cli"))


CLI_METHODS = ["kd", "distill.soft_loss=mse", "dkd distill.warmup_epochs=0", "topk", "noisy", "mutual", "sobolev", "bss", "divergence",
               "hints distill.student_layer=net.1 distill.teacher_layer=net.1"]


@pytest.mark.parametrize("method", CLI_METHODS)
def test_the_cli_names_step_batch_and_the_nan_teacher_in_one_line(cli_teachers, capsys, method):
    from distill.cli import main

    recipe, good, bad = cli_teachers
    overrides = [f"distill.method={m}" if "=" not in m else m for m in method.split()]
    name = "n" + str(CLI_METHODS.index(method))
    capsys.readouterr()
    assert main(["distill", recipe, "--quiet", "--teacher", bad, "--no-scratch", f"name={name}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("distill: error: student: step 1 (epoch 1, batch 1): ") and "hold NaN" in err, err
    assert "teacher" in err.split("step 1 (epoch 1, batch 1): ")[1] and "train.lr" not in err, err
    runs = Path(recipe).parent / "runs"
    assert not (runs / name).exists() and not (runs / f"{name}.partial").exists()
    # counter-check: the same command with the finite teacher trains and writes the run
    assert main(["distill", recipe, "--quiet", "--teacher", good, "--no-scratch", f"name={name}", *overrides]) == 0
    assert (runs / name / "student.safetensors").is_file()


@pytest.mark.parametrize("bad", ["logits", "logsumexp", "features"])
def test_a_cached_teacher_fed_nan_raises_when_a_method_asks(bad):
    from distill.methods.hints import Hints, HintsConfig
    from distill.signals import CachedTeacher

    x, y = _batch()
    student = _model("mlp", 1, 16)
    logits = torch.randn(len(x), CLASSES)
    extras = {"logsumexp": torch.logsumexp(logits, -1), "features": {"net.1": torch.randn(len(x), 32)}}
    teacher = CachedTeacher()
    method = Hints(HintsConfig(student_layer="net.1", teacher_layer="net.1"), teacher)
    teacher.feed(logits, inputs=x, **extras)
    method.setup(student, x)
    assert torch.isfinite(method(student, x, y)[0])  # counter-check
    if bad == "features":
        extras["features"]["net.1"][2, 5] = float("nan")
    else:
        (logits if bad == "logits" else extras["logsumexp"])[2] = float("nan")
    teacher.feed(logits, inputs=x, **extras)
    with pytest.raises(NonFiniteError, match="the cached teacher .* hold NaN: write the teacher cache again"):
        method(student, x, y)


def test_feature_transformer_and_derivative_losses_refuse_a_nan_teacher_and_show_a_nan_student():
    from distill.losses.feature import attention_transfer_loss, hint_loss
    from distill.losses.sobolev import sobolev_loss
    from distill.losses.transformer import attention_kl, attention_mse, embedding_mse, hidden_cosine, hidden_mse

    g = torch.Generator().manual_seed(0)
    hidden = lambda: torch.randn(2, 3, 4, generator=g)  # noqa: E731
    attn = lambda: torch.softmax(torch.randn(2, 2, 3, 3, generator=g), -1)  # noqa: E731
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    cases = [(hint_loss, hidden, "teacher_feature"), (lambda s, t: attention_transfer_loss(s, t), attn, "teacher_feature"),
             (lambda s, t: sobolev_loss(s[0], t[0]), hidden, "teacher_jvp")]
    cases += [(lambda s, t, f=f: f(s, t, mask), hidden, name) for f, name in
              ((hidden_mse, "teacher_hidden"), (embedding_mse, "teacher_emb"), (hidden_cosine, "teacher_hidden"))]
    cases += [(lambda s, t, f=f: f(s, t, mask), attn, "teacher_attn") for f in (attention_kl, attention_mse)]
    for loss, make, name in cases:
        s, t = make(), make()
        assert torch.isfinite(loss(s, t))  # counter-check
        t[0, 1, 1] = float("nan")  # a kept position
        with pytest.raises(NonFiniteError, match=f"{name} hold NaN"):
            loss(s, t)
        t[0, 1, 1] = 0.5
        s[0, 1, 1] = float("nan")
        assert torch.isnan(loss(s, t))  # the student's own NaN: in the loss, for the loop to report


def test_boundary_samples_refuse_a_teacher_that_gives_nan():
    from distill.losses.bss import boundary_samples

    teacher = _model("mlp", 0, 32)
    x, _ = _batch(8)
    base = teacher(x).argmax(-1)
    target = (base + 1) % CLASSES
    assert torch.isfinite(boundary_samples(teacher, x, base, target)).all()  # counter-check
    with pytest.raises(NonFiniteError, match="the teacher.s logits hold NaN"):
        boundary_samples(poisoned(teacher), x, base, target)
