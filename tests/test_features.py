"""Feature mimicry: layer capture by name, FitNets hints and attention transfer (losses, methods, training)."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from conftest import train_student
from distill.errors import UserError
from distill.features import capture, probe
from distill.losses.feature import attention_map, attention_transfer_loss, hint_loss
from distill.losses.kd import kd_loss
from distill.methods.attention import Attention, AttentionConfig
from distill.methods.hints import HintRegressor, Hints, HintsConfig
from distill.methods.supervised import Supervised, SupervisedConfig
from distill.recipe import TrainConfig, validate_recipe
from distill.signals import LiveTeacher
from distill.students import CNNConfig, MLPConfig, build_model
from distill.tasks.classification import evaluate
from distill.train import fit


class Wrapped(nn.Module):
    """Like DDP / Accelerate: the real model in `.module`, its layer names prefixed 'module.'."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def _mlp(seed=0, hidden=(16,)):
    torch.manual_seed(seed)
    return build_model(MLPConfig(hidden=list(hidden)), (1, 8, 8), 10)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return build_model(CNNConfig(channels=[4, 8], hidden=[16]), (1, 8, 8), 10)


# --- capture -----------------------------------------------------------------------------------------------

def test_capture_returns_exactly_the_module_outputs_and_removes_its_hooks():
    mlp, cnn = _mlp(), _cnn()
    x = torch.randn(5, 1, 8, 8)
    with capture(mlp, ["net.1", "net.2"]) as feats:
        logits = mlp(x)
    pre = mlp.net[1](mlp.net[0](x))
    torch.testing.assert_close(feats["net.1"], pre, rtol=0, atol=0)
    torch.testing.assert_close(feats["net.2"], torch.relu(pre), rtol=0, atol=0)
    torch.testing.assert_close(logits, mlp(x), rtol=0, atol=0)
    cnn.eval()
    with capture(cnn, ["features.3"]) as feats:
        cnn(x)
    torch.testing.assert_close(feats["features.3"], cnn.features[:4](x), rtol=0, atol=0)
    assert all(not m._forward_hooks for m in [*mlp.modules(), *cnn.modules()])


def test_capture_sees_through_a_ddp_style_wrapper_and_survives_inplace_ops():
    mlp = _mlp()
    wrapped, x = Wrapped(mlp), torch.randn(4, 1, 8, 8)
    with capture(wrapped, ["net.2", "module.net.1"]) as feats:
        wrapped(x)
    torch.testing.assert_close(feats["net.2"], mlp.net[:3](x))
    torch.testing.assert_close(feats["module.net.1"], mlp.net[:2](x))
    # ReLU(inplace=True) overwrites the linear layer's output after the hook ran; the record must not change.
    inplace = nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=True))
    with capture(inplace, ["0"]) as feats:
        inplace(torch.randn(8, 3))
    assert (feats["0"] < 0).any()


def test_unknown_layer_names_the_bad_name_and_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"'net\.9'.*net\.0, net\.1, net\.2, net\.3"):
        with capture(_mlp(), ["net.9"]):
            pass
    # the listing of a wrapped model shows the names the user writes, without the wrapper's prefix
    with pytest.raises(UserError, match=r"no layer named 'fetures\.3'; valid layer names: features, features\.0"):
        probe(Wrapped(_cnn()), torch.randn(2, 1, 8, 8), ["fetures.3"], "student")


def test_probe_leaves_batchnorm_statistics_and_train_mode_alone():
    cnn = _cnn().train()
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    feats = probe(cnn, torch.randn(6, 1, 8, 8) * 5 + 3, ["features.2"])
    assert feats["features.2"].shape == (6, 4, 8, 8)
    assert cnn.training and all(m.training for m in cnn.modules())
    for k, v in cnn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


# --- losses against explicit float64 computations ----------------------------------------------------------

def _np_attention(a, p):
    """Q[n] = Σ_c |A[n,c]|^p flattened, divided by its L2 norm (0 stays 0), with explicit loops."""
    n, c, h, w = a.shape
    out = np.zeros((n, h * w))
    for i in range(n):
        q = np.zeros((h, w))
        for ch in range(c):
            q += np.abs(a[i, ch]) ** p
        q = q.reshape(-1)
        norm = np.sqrt((q ** 2).sum())
        out[i] = q / norm if norm > 0 else q
    return out


def _np_at_loss(qs, qt):
    return np.mean([((qs[i] - qt[i]) ** 2).sum() for i in range(len(qs))])


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_attention_map_and_loss_match_explicit_computation(p):
    g = torch.Generator().manual_seed(int(p))
    s = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    t = torch.randn(3, 7, 5, 5, generator=g, dtype=torch.float64)  # channel counts may differ
    np.testing.assert_allclose(attention_map(s, p).numpy(), _np_attention(s.numpy(), p), rtol=1e-12)
    expected = _np_at_loss(_np_attention(s.numpy(), p), _np_attention(t.numpy(), p))
    np.testing.assert_allclose(attention_transfer_loss(s, t, p).item(), expected, rtol=1e-12)
    assert attention_transfer_loss(t, t, p).item() == pytest.approx(0.0, abs=1e-12)


def test_attention_loss_resizes_a_larger_student_map_to_the_teachers():
    # Bilinear halving (align_corners=False) samples between pixels 2i and 2i+1: the mean of each 2×2 block.
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 2, 2, generator=g, dtype=torch.float64)
    q = (s.numpy() ** 2).sum(1)
    blocks = q.reshape(2, 2, 2, 2, 2).mean(axis=(2, 4)).reshape(2, -1)
    qs = blocks / np.linalg.norm(blocks, axis=1, keepdims=True)
    expected = _np_at_loss(qs, _np_attention(t.numpy(), 2.0))
    np.testing.assert_allclose(attention_transfer_loss(s, t).item(), expected, rtol=1e-12)


def test_attention_loss_edge_cases_stay_finite():
    t = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    s = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)  # dead ReLUs: an all-zero map
    loss = attention_transfer_loss(s, t)
    assert loss.item() == pytest.approx(1.0)  # ‖0 − unit vector‖² = 1 per sample
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # p < 1 with exact zeros (ReLU outputs): |a|^p has an infinite slope at 0, the loss must not turn nan
    relu = torch.relu(torch.randn(2, 3, 4, 4, dtype=torch.float64)).requires_grad_()
    attention_transfer_loss(relu, t, p=0.5).backward()
    assert torch.isfinite(relu.grad).all() and relu.grad.abs().sum() > 0


def test_attention_loss_refuses_bad_inputs():
    four = torch.rand(2, 3, 4, 4)
    with pytest.raises(UserError, match="4-D.*student_feature.*\\(2, 48\\)"):
        attention_transfer_loss(four.flatten(1), four)
    with pytest.raises(UserError, match="batch sizes differ: 2 vs 3"):
        attention_transfer_loss(four, torch.rand(3, 3, 4, 4))
    for bad in (0, -1.0, float("nan"), "two"):
        with pytest.raises(UserError, match="p must be"):
            attention_transfer_loss(four, four, p=bad)


def test_hint_loss_matches_explicit_mean_squared_error():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64)
    t = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64)
    diff = r.numpy() - t.numpy()
    expected = sum(float(d) ** 2 for d in diff.reshape(-1)) / diff.size
    np.testing.assert_allclose(hint_loss(r, t).item(), expected, rtol=1e-12)
    assert hint_loss(r.half(), t.half()).dtype == torch.float32
    with pytest.raises(UserError, match=r"\(4, 5\).*\(4, 6\)"):
        hint_loss(torch.zeros(4, 5), torch.zeros(4, 6))


def test_regressor_maps_every_student_shape_to_the_teachers():
    cases = [((2, 3, 4, 4), (2, 5, 4, 4), "conv"),   # 1×1 conv
             ((2, 3, 4, 4), (2, 5, 2, 2), "conv"),   # student map pooled to the teacher's 2×2
             ((2, 3, 2, 2), (2, 5, 4, 4), "conv"),   # teacher map pooled to the student's 2×2
             ((2, 7), (2, 11), "last"), ((2, 6, 7), (2, 6, 11), "last"),
             ((2, 3, 4, 4), (2, 11), "flat")]
    for s_shape, t_shape, kind in cases:
        r = HintRegressor(s_shape, t_shape)
        out, target = r(torch.randn(s_shape)), r.target(torch.randn(t_shape))
        assert r.kind == kind and out.shape == target.shape, (s_shape, t_shape)


# --- configs and recipes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, fields, bad", [
    (HintsConfig, {}, r"\nstudent_layer\n"),
    (HintsConfig, {"student_layer": "net.2", "teacher_layer": "head.2", "hint_weight": -1}, r"\nhint_weight\n"),
    (HintsConfig, {"student_layer": "net.2", "teacher_layer": "head.2", "hint_epochs": -1}, r"\nhint_epochs\n"),
    (HintsConfig, {"student_layer": "", "teacher_layer": "head.2"}, r"\nstudent_layer\n"),
    (AttentionConfig, {"student_layers": [], "teacher_layers": []}, r"\nstudent_layers\n"),
    (AttentionConfig, {"student_layers": ["a"], "teacher_layers": ["b"], "p": 0}, r"\np\n"),
    (AttentionConfig, {"student_layers": ["a"], "teacher_layers": ["b"], "at_weight": -1}, r"\nat_weight\n"),
    (AttentionConfig, {"student_layers": ["a", "b"], "teacher_layers": ["c"]}, r"\nteacher_layers\n.*have 2 and 1 entries"),
])
def test_bad_parameters_are_refused_by_name(cls, fields, bad):
    with pytest.raises(ValidationError, match=bad):
        cls(**fields)


def test_methods_are_selectable_from_a_recipe():
    hints = validate_recipe({"distill": {"method": "hints", "student_layer": "net.2", "teacher_layer": "head.2",
                                         "hint_epochs": 3}}).distill
    assert isinstance(hints, HintsConfig) and hints.hint_epochs == 3 and hints.temperature == 4.0
    at = validate_recipe({"distill": {"method": "attention", "student_layers": ["features.3"],
                                      "teacher_layers": ["features.7"]}}).distill
    assert isinstance(at, AttentionConfig) and at.p == 2.0
    with pytest.raises(UserError, match="unknown key 'distill.hint_wieght'.*hint_weight"):
        validate_recipe({"distill": {"method": "hints", "student_layer": "a", "teacher_layer": "b", "hint_wieght": 1}})
    with pytest.raises(UserError, match="distill.teacher_layers: .*paired one-to-one"):
        validate_recipe({"distill": {"method": "attention", "student_layers": ["a", "b"], "teacher_layers": ["b"]}})
    with pytest.raises(UserError, match="distill.at_weight"):
        validate_recipe({"distill": {"method": "attention", "student_layers": ["a"], "teacher_layers": ["b"], "at_weight": -2}})


# --- the methods on the digits teacher -----------------------------------------------------------------------

def test_hints_loss_regressor_gradients_and_one_teacher_pass(digits, digits_teacher):
    student, x, y = _mlp(0), digits.train.x[:32], digits.train.y[:32]
    config = HintsConfig(student_layer="net.2", teacher_layer="head.2", hint_weight=0.5, hint_epochs=1)
    method = Hints(config, LiveTeacher(digits_teacher))
    method.setup(Wrapped(student), x)  # names work through a DDP-style wrapper too
    regressor = method.modules["regressor"]
    assert isinstance(regressor.layer, nn.Linear) and regressor.layer.weight.shape == (256, 16)
    assert {id(p) for p in regressor.parameters()} <= {id(p) for p in method.parameters()}

    with torch.no_grad():
        t_hidden, t_logits = digits_teacher.head[:3](digits_teacher.features(x)), digits_teacher(x)
    calls = []
    handle = digits_teacher.register_forward_hook(lambda *a: calls.append(1))
    method.start_epoch(1)  # stage 1: the hint alone, so the student's output layer gets no gradient
    loss, parts = method(student, x, y)
    expected_hint = ((regressor(student.net[:3](x)) - t_hidden) ** 2).mean()
    torch.testing.assert_close(loss, expected_hint)
    assert set(parts) == {"hint"}
    loss.backward()
    assert student.net[1].weight.grad is not None and student.net[3].weight.grad is None

    method.start_epoch(2)  # stage 2: KD + hint_weight · hint
    for p in [*student.parameters(), *method.parameters()]:
        p.grad = None
    loss, parts = method(Wrapped(student), x, y)
    handle.remove()
    kd, _ = kd_loss(student(x), t_logits, y, temperature=4.0, hard_weight=0.1, soft_weight=0.9)
    torch.testing.assert_close(loss, kd + 0.5 * expected_hint)
    assert set(parts) == {"hard", "soft", "hint"}
    loss.backward()
    assert len(calls) == 2  # one teacher forward per batch gives both its logits and its features
    assert regressor.layer.weight.grad is not None and regressor.layer.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in digits_teacher.parameters())


def test_setup_refuses_unknown_or_unsuitable_layers(digits, digits_teacher):
    x = digits.train.x[:8]
    with pytest.raises(UserError, match=r"teacher has no layer named 'head\.9'.*features\.0"):
        Hints(HintsConfig(student_layer="net.2", teacher_layer="head.9"), LiveTeacher(digits_teacher)).setup(_mlp(), x)
    at = Attention(AttentionConfig(student_layers=["net.2"], teacher_layers=["features.2"]), LiveTeacher(digits_teacher))
    with pytest.raises(UserError, match=r"student layer 'net\.2' outputs shape \(8, 16\).*4-D"):
        at.setup(_mlp(), x)


def test_attention_method_loss_is_kd_plus_weighted_at(digits, digits_teacher):
    student, x, y = _cnn(0), digits.train.x[:16], digits.train.y[:16]
    config = AttentionConfig(student_layers=["features.2", "features.7"], teacher_layers=["features.2", "features.6"],
                             at_weight=3.0)
    loss, parts = Attention(config, LiveTeacher(digits_teacher))(student, x, y)
    with torch.no_grad():
        t2, t6 = digits_teacher.features[:3](x), digits_teacher.features[:7](x)
        t_logits = digits_teacher(x)
    s2, s7 = student.features[:3](x), student.features(x)  # features.7 (2×2) is resized to the teacher's 4×4
    at = attention_transfer_loss(s2, t2) + attention_transfer_loss(s7, t6)
    kd, _ = kd_loss(student(x), t_logits, y, temperature=4.0, hard_weight=0.1, soft_weight=0.9)
    torch.testing.assert_close(loss, kd + 3.0 * at)
    torch.testing.assert_close(parts["at"], at.detach())
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in digits_teacher.parameters())


def test_hints_student_beats_scratch_on_digits(digits, digits_teacher):
    """MLP hidden ReLU ('net.2', 64 units) guided by the teacher head's hidden ReLU ('head.2', 256) via a Linear."""
    config = HintsConfig(student_layer="net.2", teacher_layer="head.2")
    scratch = [train_student(Supervised(SupervisedConfig()), digits, s) for s in (0, 1)]
    hinted = [train_student(Hints(config, LiveTeacher(digits_teacher)), digits, s) for s in (0, 1)]
    assert sum(hinted) <= sum(scratch), (hinted, scratch)


def test_attention_transfer_cnn_student_matches_scratch_and_the_teachers_attention(digits, digits_teacher):
    """A small CNN, same init and batches for both; AT on the outputs of the two conv blocks (4×4 and 2×2 maps)."""
    layers = ["features.3", "features.7"]
    config = AttentionConfig(student_layers=layers, teacher_layers=layers)

    def train(method, seed):
        torch.manual_seed(seed)
        model = build_model(CNNConfig(channels=[8, 16], hidden=[32]), digits.input_shape, digits.num_classes)
        fit(model, method, digits.train, digits.val, TrainConfig(epochs=15, batch_size=64, lr=0.003), seed=seed,
            progress=False)
        return model.eval(), evaluate(model, digits.test)["errors"]

    def distance(model):  # summed AT loss to the teacher on the test split
        x = digits.test.x
        with torch.no_grad(), capture(model, layers) as s, capture(digits_teacher, layers) as t:
            model(x), digits_teacher(x)
        return sum(attention_transfer_loss(s[name], t[name]).item() for name in layers)

    scratch = [train(Supervised(SupervisedConfig()), s) for s in (0, 1)]
    at = [train(Attention(config, LiveTeacher(digits_teacher)), s) for s in (0, 1)]
    errors = ([e for _, e in at], [e for _, e in scratch])
    # AT must pull the student's attention maps to the teacher's; on digits its accuracy gain is within noise
    # (17 vs 21 errors with 1 thread, 17 vs 15 with 2), so "matches" allows 3 errors of 718 predictions.
    assert all(distance(m) < 0.5 * distance(s) for (m, _), (s, _) in zip(at, scratch))
    assert sum(errors[0]) <= sum(errors[1]) + 3, errors
