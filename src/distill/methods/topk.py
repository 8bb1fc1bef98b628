"""Top-k ("truncated softmax") KD: the teacher's soft targets kept only on its k most likely classes.

Per row, with S = the teacher's top-k classes, p = softmax(logits / T):
  loss = hard_weight · CE(s, y) + soft_weight · SOFT
  SOFT = T² · KL(softmax(t_S/T) || softmax(s_S/T))                              (rest: renormalize)
       | T² · KL([p_t,S, 1 - Σ_S p_t] || [p_s,S, 1 - Σ_S p_s])  over k+1 buckets  (rest: bucket)
With k >= the number of classes both equal Hinton's T²·KL(softmax(t/T) || softmax(s/T))
(Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"). Truncating the teacher to
its top k is what a top-k logit cache stores for LLM vocabularies (e.g. sparse-logit KD). Rows without a
label (label -1) take the teacher's argmax as their hard label when pseudo_labels is on.
"""

from typing import Literal

import torch
from pydantic import Field

from distill.losses.hard import hard_label_loss
from distill.losses.topk import topk_kd_loss
from distill.methods.base import Method, register
from distill.methods.kd import SoftTargetConfig


class TopKConfig(SoftTargetConfig):
    method: Literal["topk"] = "topk"
    k: int = Field(5, ge=1, description="number of the teacher's most likely classes kept per row")
    rest: Literal["renormalize", "bucket"] = Field(
        "bucket", description="the mass outside the top k: dropped and both distributions renormalised, or one extra bucket"
    )


@register
class TopK(Method):
    name = "topk"
    summary = "Truncated-softmax KD: T²·KL on the teacher's top-k classes, the rest renormalised away or one bucket."
    Config = TopKConfig

    def __call__(self, student, x, y):
        c = self.config
        teacher_logits = self.teacher(x)
        student_logits = student(x)
        soft = topk_kd_loss(student_logits, teacher_logits, c.k, temperature=c.temperature, rest=c.rest, t2_scaling=c.t2_scaling)
        if c.hard_weight > 0:
            hard = hard_label_loss(student_logits, y, teacher_logits, pseudo_labels=c.pseudo_labels)
        else:
            hard = torch.zeros((), dtype=soft.dtype, device=soft.device)
        # A zero-weighted term is left out rather than multiplied by 0, so an inf/nan in it cannot poison the total.
        total = (c.hard_weight * hard if c.hard_weight > 0 else 0) + (c.soft_weight * soft if c.soft_weight > 0 else 0)
        return total, {"hard": hard.detach(), "soft": soft.detach()}
