"""No teacher: cross-entropy to the labels. Trains the teacher and the `scratch` baseline."""

from typing import Literal

from distill.losses import hard_label_loss
from distill.methods.base import Method, MethodConfig, register


class SupervisedConfig(MethodConfig):
    method: Literal["supervised"] = "supervised"


@register
class Supervised(Method):
    name = "supervised"
    summary = "No teacher: cross-entropy to the labels (the scratch baseline; unlabelled rows are skipped)."
    Config = SupervisedConfig
    needs_teacher = False

    def __call__(self, student, x, y):
        loss = hard_label_loss(student(x), y, pseudo_labels=False)
        return loss, {"hard": loss.detach()}
