"""FitNets hints (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015, "FitNets: Hints for Thin Deep Nets").

A trainable regressor r maps the output v_g(x) of the student's guided layer to the shape of the output u_h(x) of
the teacher's hint layer:

    HINT = mean over elements of (r(v_g(x)) − u_h(x))²     (the paper's ½‖u_h − r(v_g)‖², up to a constant factor)
    loss = HINT                              in epochs 1 .. hint_epochs   (stage 1: hint-based pre-training)
    loss = KD + hint_weight · HINT           in later epochs              (KD exactly as in the `kd` method)

hint_epochs = 0 (default) is the single-stage variant; the paper's two stages are hint_epochs > 0 with
hint_weight 0. In stage 1 only the layers up to the guided one (and r) receive gradients, as in the paper.

The regressor, built in setup from one forward of both networks on an example batch:
  * both activations 4-D (N, C, H, W): a 1×1 Conv2d C_s → C_t. If the spatial sizes differ, both maps are reduced
    to the smaller height and width by adaptive average pooling first (the paper instead sizes a conv kernel so that
    its output matches; pooling keeps r small and also covers a teacher map smaller than the student's);
  * same rank and equal but for the last dim (vectors (N, D), tokens (N, L, D)): a Linear D_s → D_t on the last dim;
  * otherwise both are flattened to (N, ·) and joined by a Linear.
On text, token features (B, L, D) with the batch's attention_mask are compared only at real tokens (the same mean
over kept tokens and units as hidden_mse); padding never counts.
"""

import math
import warnings
from typing import Literal

from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from distill.features import capture, probe, teacher_forward, teacher_probe
from distill.losses.feature import hint_loss
from distill.losses.kd import kd_loss
from distill.losses.transformer import hidden_mse
from distill.methods.base import Method, register
from distill.methods.kd import KDConfig


class HintsConfig(KDConfig):
    method: Literal["hints"] = "hints"
    student_layer: str = Field(..., min_length=1, description="student module whose output is guided, named as in "
                                                               "dict(model.named_modules()), e.g. 'net.2'")
    teacher_layer: str = Field(..., min_length=1, description="teacher module whose output is the hint, e.g. 'head.2'")
    hint_weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of the hint MSE added to the KD loss")
    hint_epochs: int = Field(0, ge=0, description="first epochs trained on the hint loss alone (FitNets stage 1)")


class HintRegressor(nn.Module):
    """r: the student's feature -> the teacher's feature shape (see the module docstring for the three cases)."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        s, t = student_shape, teacher_shape
        self.pool_to = None
        if len(s) == 4 and len(t) == 4:
            self.kind = "conv"
            self.layer = nn.Conv2d(s[1], t[1], kernel_size=1)
            if s[2:] != t[2:]:
                self.pool_to = (min(s[2], t[2]), min(s[3], t[3]))
        elif len(s) == len(t) and s[1:-1] == t[1:-1]:
            self.kind = "last"
            self.layer = nn.Linear(s[-1], t[-1])
        else:
            self.kind = "flat"
            self.layer = nn.Linear(math.prod(s[1:]), math.prod(t[1:]))

    def _shape(self, x: Tensor) -> Tensor:
        if self.kind == "flat":
            return x.flatten(1)
        if self.pool_to is not None and tuple(x.shape[2:]) != self.pool_to:
            return F.adaptive_avg_pool2d(x, self.pool_to)
        return x

    def forward(self, student_feature: Tensor) -> Tensor:
        return self.layer(self._shape(student_feature))

    def target(self, teacher_feature: Tensor) -> Tensor:
        """The teacher feature reshaped/pooled the same way, so it matches forward()'s output."""
        return self._shape(teacher_feature)


@register
class Hints(Method):
    name = "hints"
    summary = "FitNets: KD + hint_weight·MSE(regressor(student layer), teacher layer); optional hint-only first epochs."
    Config = HintsConfig

    def setup(self, student, example):
        c = self.config
        s = probe(student, example, [c.student_layer], "student")[c.student_layer]
        t = teacher_probe(self.teacher, example, [c.teacher_layer])[c.teacher_layer]
        self.modules["regressor"] = HintRegressor(tuple(s.shape), tuple(t.shape)).to(s.device)

    def __call__(self, student, x, y):
        c = self.config
        if "regressor" not in self.modules:
            # Only a hand-written loop gets here (the trainer calls setup); keep it working, but say why.
            warnings.warn("hints: the regressor was built on the first batch; an optimizer created before this does "
                          "not train it. Call method.setup(student, x) before building the optimizer.", stacklevel=2)
            self.setup(student, x)
        regressor = self.modules["regressor"]
        teacher_logits, teacher_feats = teacher_forward(self.teacher, x, [c.teacher_layer])
        with capture(student, [c.student_layer], "student") as feats:
            student_logits = student(x)
        regressed, target = regressor(feats[c.student_layer]), regressor.target(teacher_feats[c.teacher_layer])
        mask = x.get("attention_mask") if isinstance(x, dict) else None
        if mask is not None and regressed.dim() == 3 and regressed.shape[:2] == mask.shape:
            hint = hidden_mse(regressed, target, mask)  # token features [B, L, D]: padding positions never count
        else:
            hint = hint_loss(regressed, target)
        if self.epoch <= c.hint_epochs:
            return hint, {"hint": hint.detach()}
        loss, parts = kd_loss(
            student_logits, teacher_logits, y,
            temperature=c.temperature, hard_weight=c.hard_weight, soft_weight=c.soft_weight,
            soft=c.soft_loss, t2_scaling=c.t2_scaling, pseudo_labels=c.pseudo_labels,
        )
        if c.hint_weight > 0:
            loss = loss + c.hint_weight * hint
        return loss, {**parts, "hint": hint.detach()}
