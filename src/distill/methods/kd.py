"""Soft-target knowledge distillation (Hinton, Vinyals & Dean 2015; NLP Architect's TeacherStudentDistill).

loss = hard_weight · CE(s, y) + soft_weight · SOFT(s, t)
SOFT = T² · KL(softmax(t/T) || softmax(s/T))   (soft_loss: kl, the default)
     | T² · CE(softmax(t/T), softmax(s/T))      (soft_loss: soft_ce)
     | MSE(s, t) on raw logits                  (soft_loss: mse)
Rows without a label (label -1) take the teacher's argmax as their hard label when pseudo_labels is on.
"""

from typing import Literal

from pydantic import Field, model_validator

from distill.losses import hard_label_loss, kd_loss
from distill.methods.base import Method, MethodConfig, register


class SoftTargetConfig(MethodConfig):
    """Fields shared by the methods built on soft targets plus a hard-label term."""

    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    hard_weight: float = Field(0.1, ge=0, description="w_s, weight of the cross-entropy to the labels")
    soft_weight: float = Field(0.9, ge=0, description="w_d, weight of the soft-target term")
    t2_scaling: bool = Field(True, description="multiply the soft term by T² (Hinton) so its gradients do not shrink as 1/T²")
    pseudo_labels: bool = Field(True, description="unlabelled rows learn the teacher's argmax as a hard label")

    @model_validator(mode="after")
    def _some_weight(self):
        if self.hard_weight == 0 and self.soft_weight == 0:
            raise ValueError("hard_weight and soft_weight are both 0: set soft_weight > 0")
        return self


class KDConfig(SoftTargetConfig):
    method: Literal["kd"] = "kd"
    soft_loss: Literal["kl", "soft_ce", "mse"] = "kl"


@register
class KD(Method):
    name = "kd"
    summary = "Hinton soft targets: w_s·CE(labels) + w_d·T²·KL(teacher/T || student/T), or soft CE / logit MSE."
    Config = KDConfig

    def __call__(self, student, x, y):
        c = self.config
        if c.soft_weight == 0 and bool((y >= 0).all()):
            # labels only (e.g. sequence-level KD: the labels are the teacher's own translations): the teacher's
            # logits would serve no term, so it is not run
            hard = hard_label_loss(student(x), y, pseudo_labels=False)
            return c.hard_weight * hard, {"hard": hard.detach()}
        teacher_logits = self.teacher(x)
        student_logits = student(x)
        loss, parts = kd_loss(
            student_logits, teacher_logits, y,
            temperature=c.temperature, hard_weight=c.hard_weight, soft_weight=c.soft_weight,
            soft=c.soft_loss, t2_scaling=c.t2_scaling, pseudo_labels=c.pseudo_labels,
        )
        return loss, parts
