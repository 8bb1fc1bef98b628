"""Top-k ("truncated softmax") KD: the teacher's soft targets kept only on its k most likely classes.

Per row, with S = the teacher's top-k classes, p = softmax(logits / T):
  loss = hard_weight · CE(s, y) + soft_weight · SOFT
  SOFT = T² · KL(softmax(t_S/T) || softmax(s_S/T))                              (rest: renormalize)
       | T² · KL([p_t,S, 1 - Σ_S p_t] || [p_s,S, 1 - Σ_S p_s])  over k+1 buckets  (rest: bucket)
With k >= the number of classes both equal Hinton's T²·KL(softmax(t/T) || softmax(s/T))
(Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"). Truncating the teacher to
its top k is what a top-k logit cache stores for LLM vocabularies (e.g. sparse-logit KD). Rows without a
label (label -1) take the teacher's argmax as their hard label when pseudo_labels is on.

From a top-k cache (distill cache --top-k K, K >= k) the teacher is known on its top K classes only. rest:
renormalize is exact at any T. rest: bucket takes the mass outside the top k from the stored logsumexp of the
full logits, which is exact at T = 1 only (the bucket at T needs logsumexp(t / T)); other temperatures are refused.
"""

from typing import Literal

import torch
from pydantic import Field

from distill.losses.hard import hard_label_loss
from distill.errors import UserError
from distill.losses.topk import topk_kd_loss, topk_kd_loss_from_indices
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
        stored_logsumexp = _cached_logsumexp(self.teacher, x)
        if stored_logsumexp is None:
            soft = topk_kd_loss(student_logits, teacher_logits, c.k, temperature=c.temperature, rest=c.rest,
                                t2_scaling=c.t2_scaling)
        else:
            soft = _from_topk_cache(student_logits, teacher_logits, stored_logsumexp, c)
        if c.hard_weight > 0:
            hard = hard_label_loss(student_logits, y, teacher_logits, pseudo_labels=c.pseudo_labels)
        else:
            hard = torch.zeros((), dtype=soft.dtype, device=soft.device)
        # A zero-weighted term is left out rather than multiplied by 0, so an inf/nan in it cannot poison the total.
        total = (c.hard_weight * hard if c.hard_weight > 0 else 0) + (c.soft_weight * soft if c.soft_weight > 0 else 0)
        return total, {"hard": hard.detach(), "soft": soft.detach()}


def _from_topk_cache(student_logits, teacher_logits, stored_logsumexp, c: TopKConfig):
    """SOFT from a top-k cache, whose teacher logits are -inf outside its stored top K."""
    values, classes = teacher_logits.topk(min(c.k, teacher_logits.shape[-1]), dim=-1)
    if bool(torch.isneginf(values[..., -1]).any()):
        raise UserError(f"topk: k={c.k} is more than the classes the teacher cache stores per row: set distill.k to at "
                        "most the cache's top k, or write the cache with a larger --top-k")
    if c.rest == "bucket" and c.temperature != 1:
        raise UserError(f"topk: rest=bucket from a top-k teacher cache is exact only at temperature 1 (the cache stores "
                        f"logsumexp(t), not logsumexp(t / {c.temperature:g})): set distill.temperature=1, "
                        "rest=renormalize, or use a full-logit cache")
    return topk_kd_loss_from_indices(student_logits, values, classes, temperature=c.temperature, rest=c.rest,
                                     t2_scaling=c.t2_scaling, teacher_logsumexp=stored_logsumexp)


def _cached_logsumexp(teacher, x):
    """A top-k cache's logsumexp of the full teacher logits (its logits are -inf outside the top k), else None."""
    read = getattr(teacher, "logsumexp", None)
    return read(x) if callable(read) else None
