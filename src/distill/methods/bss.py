"""Boundary supporting samples (Heo, Lee, Yun & Choi, AAAI 2019,
"Knowledge Distillation with Adversarial Samples Supporting Decision Boundary").

Every batch, part of the samples are pushed by gradient steps on the teacher's input towards its decision
boundary between the predicted class b and a nearby class k (distill.losses.bss.boundary_samples):

    L_k(x) = z_b(x) - z_k(x),    x^{i+1} = x^i - η · (L_k(x^i) + 1e-4) · ∇L_k(x^i) / ‖∇L_k(x^i)‖₂

(`steps` iterations at most; a sample stops once the teacher's prediction flips). The student then matches
the teacher there too:

    loss = KD(x, y)  +  bss_weight · T² · KL(softmax(t(x̂)/T) || softmax(s(x̂)/T))        (mean over x̂)

KD(x, y) is the kd method's loss (hard_weight, soft_weight, soft_loss, pseudo_labels, t2_scaling; T² of the
BSS term only with t2_scaling). Choices, following the authors' code (bhheo/BSS_distillation):
- samples to push: those the teacher classifies correctly (or unlabelled ones), of which a random
  ceil(ratio · batch) are used (the code takes the teacher-student disagreement's top 64; random is cheaper);
- target class k: drawn among the teacher's ranks 2..top_classes with probability ∝ the teacher's softmax
  (top_classes: 2 always takes the runner-up class);
- the samples are clamped to the batch's value range [min x, max x] after every step (the code clamps to
  its normalised pixel range).
The paper decays the BSS weight (and the KD weight) over training; a method does not know the number of
epochs, so bss_weight is constant here. step_size η is in input units per logit of margin: 0.03 suits
inputs in [0, 1] (digits, MNIST) — on the test teacher ‖∇L_k‖ ≈ 14, so each step closes ~40% of the
remaining (linearised) distance and 10 steps take the median margin from ~6.6 to ~0.05 without crossing.
Scale it inversely with the input scale (e.g. ~0.1 for standardised images).
Cost per batch: `steps` teacher forward+backward passes on the chosen samples, plus one more teacher and
student forward on them.
"""

import math
from typing import Literal

import torch
from pydantic import Field

from distill.errors import UserError
from distill.features import teacher_model
from distill.losses.bss import boundary_samples
from distill.losses.kd import kd_loss
from distill.losses.kl import soft_target_kl
from distill.methods.base import Method, register
from distill.methods.kd import KDConfig


class BSSConfig(KDConfig):
    method: Literal["bss"] = "bss"  # type: ignore[assignment]
    temperature: float = Field(3.0, gt=0, description="softmax temperature T of the KD and BSS terms (the paper's 3)")
    bss_weight: float = Field(1.0, ge=0, description="weight of the KL on boundary supporting samples (constant)")
    ratio: float = Field(0.5, gt=0, le=1, description="share of the batch turned into boundary supporting samples")
    steps: int = Field(10, ge=1, description="gradient steps of the boundary search (the paper's 10)")
    step_size: float = Field(0.03, gt=0, description="η of the boundary search, in input units per logit of margin")
    top_classes: int = Field(2, ge=2, description="target classes are drawn from the teacher's ranks 2..top_classes")


@register
class BSS(Method):
    name = "bss"
    summary = "KD plus KD on adversarial samples moved to the teacher's decision boundary (Heo et al. 2019)."
    Config = BSSConfig
    needs_continuous_inputs = True
    reads_teacher_network = True

    def __call__(self, student, x, y):
        c = self.config
        teacher_logits = self.teacher(x)
        loss, parts = kd_loss(
            student(x), teacher_logits, y,
            temperature=c.temperature, hard_weight=c.hard_weight, soft_weight=c.soft_weight,
            soft=c.soft_loss, t2_scaling=c.t2_scaling, pseudo_labels=c.pseudo_labels,
        )
        if c.bss_weight == 0:
            return loss, {**parts, "bss": torch.zeros_like(parts["soft"])}
        x_adv = self.boundary_batch(x, y, teacher_logits)
        if x_adv is None:  # the teacher got every sample wrong: nothing to push
            return loss, {**parts, "bss": torch.zeros_like(parts["soft"])}
        bss = soft_target_kl(student(x_adv), self.teacher(x_adv), c.temperature, t2_scaling=c.t2_scaling)
        return loss + c.bss_weight * bss, {**parts, "bss": bss.detach()}

    def boundary_batch(self, x, y, teacher_logits):
        """Pick samples and target classes, then run the boundary search; None when no sample qualifies."""
        c = self.config
        model = teacher_model(self.teacher, "input gradients")
        num_classes = teacher_logits.shape[-1]
        if c.top_classes > num_classes:
            raise UserError(f"bss.top_classes ({c.top_classes}) must be <= the number of classes ({num_classes})")
        base = teacher_logits.argmax(-1)
        labels = y.to(base.device) if y is not None else torch.full_like(base, -1)
        # A wrongly classified sample would be pushed towards a boundary of the wrong class.
        candidates = torch.nonzero((labels == base) | (labels == -1)).squeeze(1)
        if candidates.numel() == 0:
            return None
        n = min(candidates.numel(), math.ceil(c.ratio * x.shape[0]))
        idx = candidates[torch.randperm(candidates.numel(), device=candidates.device)[:n]]
        ranked = teacher_logits[idx].topk(c.top_classes, dim=-1)
        # softmax over ranks 2..top_classes = the teacher's probabilities renormalised on them (no underflow).
        pick = torch.multinomial(torch.softmax(ranked.values[:, 1:].float(), dim=-1), 1)
        target = ranked.indices[:, 1:].gather(1, pick).squeeze(1)
        model.eval()
        return boundary_samples(
            model, x[idx], base[idx], target, steps=c.steps, step_size=c.step_size,
            clamp=(float(x.min()), float(x.max())) if x.min() < x.max() else None,
        )
