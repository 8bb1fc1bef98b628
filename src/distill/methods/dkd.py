"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022; reference: megvii-research/mdistiller).

loss = ce_weight · CE(s, y) + w(epoch) · (alpha · TCKD + beta · NCKD)
TCKD = T² · KL([p^t_g, 1 - p^t_g] || [p^s_g, 1 - p^s_g])          p = softmax(z / T), g = target class
NCKD = T² · KL(softmax(t_{-g} / T) || softmax(s_{-g} / T))          over the C-1 non-target classes
w(epoch) = min(epoch / warmup_epochs, 1)   (1 when warmup_epochs = 0; epoch is 1-based, set by the trainer)
Unlabelled rows (label -1) take the teacher's argmax as g, and as their CE label.
In a user's own loop (Distiller.loss) call `distiller.method.start_epoch(e)` each epoch, or the warm-up
stays at its first-epoch weight 1 / warmup_epochs.
"""

from typing import Literal

from pydantic import Field, model_validator

from distill.losses.dkd import dkd_loss
from distill.losses.hard import hard_label_loss
from distill.methods.base import Method, MethodConfig, register


class DKDConfig(MethodConfig):
    method: Literal["dkd"] = "dkd"
    alpha: float = Field(1.0, ge=0, description="weight of TCKD, the target-vs-rest binary KL")
    beta: float = Field(8.0, ge=0, description="weight of NCKD, the KL among the non-target classes (8 on CIFAR-100)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy to the labels")
    warmup_epochs: int = Field(20, ge=0, description="the DKD term ramps up linearly over this many epochs; 0 = none")

    @model_validator(mode="after")
    def _some_weight(self):
        if self.alpha == 0 and self.beta == 0 and self.ce_weight == 0:
            raise ValueError("alpha, beta and ce_weight are all 0: set beta > 0")
        return self


@register
class DKD(Method):
    name = "dkd"
    summary = "Decoupled KD (Zhao et al. 2022): ce_weight·CE + warm-up·(alpha·TCKD + beta·NCKD), target and non-target KL apart."
    Config = DKDConfig

    def __call__(self, student, x, y):
        c = self.config
        teacher_logits = self.teacher(x)
        student_logits = student(x)
        kd, parts = dkd_loss(student_logits, teacher_logits, y, alpha=c.alpha, beta=c.beta, temperature=c.temperature)
        ramp = min(self.epoch / c.warmup_epochs, 1.0) if c.warmup_epochs > 0 else 1.0
        ce = hard_label_loss(student_logits, y, teacher_logits, pseudo_labels=True)
        # Skip a zero-weighted term instead of multiplying by 0, so an inf/nan in it can't poison the total.
        loss = (c.ce_weight * ce if c.ce_weight > 0 else 0) + (ramp * kd if c.alpha > 0 or c.beta > 0 else 0)
        return loss, {"ce": ce.detach(), **parts}
