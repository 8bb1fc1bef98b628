"""Noisy teacher (Sau & Balasubramanian 2016, "Deep Model Compression: Distilling Knowledge from Noisy Teachers").

With probability p per batch the teacher's logits z are perturbed before the KD loss, ξ ~ N(0, σ²) per element:
  z~ = z · (1 + ξ)   (mode: multiplicative, the paper)
     | z + ξ         (mode: additive)
  loss = kd_loss(s, z~, y) = hard_weight · CE(s, y) + soft_weight · SOFT(s, z~)     (SOFT as in method kd)
The noise acts as a regulariser on the targets (the paper matches logits by L2: soft_loss: mse). Unperturbed
batches use z itself. Pseudo-labels of unlabelled rows come from the (possibly noisy) teacher logits.
The coin and the noise come from torch's global RNG, so a seeded run and its checkpoints repeat them.
"""

from typing import Literal

import torch
from pydantic import Field

from distill.losses.kd import kd_loss
from distill.losses.noise import perturb_logits
from distill.methods.base import Method, register
from distill.methods.kd import KDConfig


class NoisyConfig(KDConfig):
    method: Literal["noisy"] = "noisy"
    sigma: float = Field(0.1, ge=0, allow_inf_nan=False, description="standard deviation σ of the Gaussian noise ξ")
    p: float = Field(0.5, ge=0, le=1, description="probability that a batch's teacher logits are perturbed")
    mode: Literal["multiplicative", "additive"] = Field(
        "multiplicative", description="z·(1+ξ) as in the paper, or z+ξ"
    )


@register
class Noisy(Method):
    name = "noisy"
    summary = "Noisy teacher: with probability p per batch, teacher logits z·(1+ξ) or z+ξ, ξ~N(0,σ²), then KD."
    Config = NoisyConfig

    def __call__(self, student, x, y):
        c = self.config
        teacher_logits = self.teacher(x)
        # p == 0 / p == 1 draw no coin, so p=0 consumes no randomness and trains exactly like kd.
        perturb = c.sigma > 0 and c.p > 0 and (c.p >= 1 or bool(torch.rand(()) < c.p))
        if perturb:
            teacher_logits = perturb_logits(teacher_logits, c.sigma, c.mode)
        loss, parts = kd_loss(
            student(x), teacher_logits, y,
            temperature=c.temperature, hard_weight=c.hard_weight, soft_weight=c.soft_weight,
            soft=c.soft_loss, t2_scaling=c.t2_scaling, pseudo_labels=c.pseudo_labels,
        )
        parts["perturbed"] = torch.tensor(float(perturb))
        return loss, parts
