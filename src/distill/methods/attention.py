"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention"), activation-based.

For each pair j of a student layer and a teacher layer with 4-D outputs A (N, C, H, W):

    Q = Σ_c |A_c|^p, flattened to H·W and L2-normalised per sample
    AT_j = (1/N) Σ_n ‖ Q_s,n/‖Q_s,n‖₂ − Q_t,n/‖Q_t,n‖₂ ‖₂²
    loss = KD + at_weight · Σ_j AT_j                       (KD exactly as in the `kd` method)

Channel counts may differ; a student map of another spatial size is resized to the teacher's by bilinear
interpolation. Weighting: the authors' code averages the squared differences over positions as well and weights by
β/2 = 500, which is at_weight = 500/(H·W) here: 0.5, 2 and 8 for the 32×32, 16×16 and 8×8 maps of their CIFAR
networks. The default at_weight 2 is that middle value (β = 1000 on 16×16 maps); as each AT_j lies in [0, 4], it
keeps AT on the scale of the KD term whatever the map size. On digits, 1, 2 and 10 gave about the same test errors.
"""

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, ValidationInfo, field_validator

from distill.errors import UserError
from distill.features import capture, probe, teacher_forward, teacher_probe
from distill.losses.feature import attention_transfer_loss
from distill.losses.kd import kd_loss
from distill.methods.base import Method, register
from distill.methods.kd import KDConfig

LayerName = Annotated[str, StringConstraints(min_length=1)]


class AttentionConfig(KDConfig):
    method: Literal["attention"] = "attention"
    student_layers: list[LayerName] = Field(..., min_length=1, description="student modules with 4-D outputs, "
                                            "named as in dict(model.named_modules()), e.g. ['features.2']")
    teacher_layers: list[LayerName] = Field(..., min_length=1, description="teacher modules paired one-to-one with "
                                            "student_layers")
    p: float = Field(2.0, gt=0, allow_inf_nan=False, description="exponent of the attention map Σ_c |A_c|^p")
    at_weight: float = Field(2.0, ge=0, allow_inf_nan=False, description="weight of the summed attention losses")

    @field_validator("teacher_layers")
    @classmethod
    def _paired(cls, teacher_layers, info: ValidationInfo):
        # a field validator (not a model one) so the error is located at teacher_layers in recipes and the API
        student_layers = info.data.get("student_layers")
        if student_layers is not None and len(student_layers) != len(teacher_layers):
            raise ValueError(f"student_layers and teacher_layers are paired one-to-one but have "
                             f"{len(student_layers)} and {len(teacher_layers)} entries")
        return teacher_layers


@register
class Attention(Method):
    name = "attention"
    summary = "Attention transfer: KD + at_weight·Σ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖², Q = Σ_c |A_c|^p of paired conv layers."
    Config = AttentionConfig

    def setup(self, student, example):
        # No trainable parts; fail before training if a layer is unknown or not 4-D.
        c = self.config
        for role, feats in (("student", probe(student, example, c.student_layers, "student")),
                            ("teacher", teacher_probe(self.teacher, example, c.teacher_layers))):
            for name, f in feats.items():
                if f.dim() != 4:
                    raise UserError(f"attention: {role} layer {name!r} outputs shape {tuple(f.shape)}; attention "
                                    "transfer needs 4-D (N, C, H, W) activations, e.g. a conv or its ReLU")

    def __call__(self, student, x, y):
        c = self.config
        teacher_logits, teacher_feats = teacher_forward(self.teacher, x, c.teacher_layers)
        with capture(student, c.student_layers, "student") as feats:
            student_logits = student(x)
        at = sum(attention_transfer_loss(feats[s], teacher_feats[t], c.p)
                 for s, t in zip(c.student_layers, c.teacher_layers))
        loss, parts = kd_loss(
            student_logits, teacher_logits, y,
            temperature=c.temperature, hard_weight=c.hard_weight, soft_weight=c.soft_weight,
            soft=c.soft_loss, t2_scaling=c.t2_scaling, pseudo_labels=c.pseudo_labels,
        )
        if c.at_weight > 0:
            loss = loss + c.at_weight * at
        return loss, {**parts, "at": at.detach()}
