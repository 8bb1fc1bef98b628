"""Sobolev training (Czarnecki, Osindero, Jaderberg, Świrszcz & Pascanu, NeurIPS 2017, "Sobolev Training
for Neural Networks"), stochastic variant, order 1: the student matches the teacher's outputs (the KD loss,
order 0) and the teacher's derivatives w.r.t. the input along random directions (order 1).

loss  = hard_weight · CE(s, y) + soft_weight · SOFT(s, t) + derivative_weight · DERIV
        (HARD and SOFT exactly as in kd: distill.losses.kd_loss with this config's KD fields)
DERIV = (1/B) Σ_b Σ_{k=1..K} Σ_c ( ∂f(s(x_b))_c/∂x · v_{b,k} − ∂f(t(x_b))_c/∂x · v_{b,k} )²
v_{b,k} uniform on the unit sphere of one sample's input space, K = directions, drawn afresh every batch
f(z)  = log_softmax(z / T)   (target: log_probs, the default)  |  z / T   (target: logits)

log_probs is the default because it differentiates the distribution that the order-0 KL matches and is
blind to a per-input shift of all logits, which changes no prediction (see losses.sobolev.sobolev_target).
f carries the 1/T of the softened outputs with no T² compensation, so DERIV shrinks as 1/T²: at T = 4 the
default weight 1 is 1/16 on the raw-logit scale. On digits (CNN teacher, MLP student) that scale helps,
while weight 1 on raw logits, where the teacher's derivatives dwarf the soft term, trains worse than scratch.
The derivatives are Jacobian-vector products by double backward; the full Jacobian is never formed.
The teacher needs gradients w.r.t. its input, so this method runs the teacher network itself (eval mode,
frozen parameters) instead of the gradient-free teacher signal; its logits come from that same forward.
"""

from functools import partial
from typing import Literal

from pydantic import Field
from torch import nn

from distill.features import teacher_model
from distill.losses.kd import kd_loss
from distill.losses.sobolev import (
    directional_derivatives,
    random_unit_directions,
    sobolev_loss,
    sobolev_target,
)
from distill.methods.base import Method, register
from distill.methods.kd import KDConfig


class SobolevConfig(KDConfig):
    method: Literal["sobolev"] = "sobolev"
    derivative_weight: float = Field(1.0, ge=0, description="weight of the derivative-matching (order-1) term; 0 gives plain KD")
    directions: int = Field(1, ge=1, description="random input directions per sample for the directional derivatives")
    target: Literal["logits", "log_probs"] = Field(
        "log_probs", description="differentiate the softened log-probabilities log_softmax(z/T) (log_probs) or the softened logits z/T (logits)"
    )


@register
class Sobolev(Method):
    name = "sobolev"
    summary = "Sobolev training (order 1): KD plus matching the teacher's input derivatives along random directions."
    Config = SobolevConfig
    needs_continuous_inputs = True
    reads_teacher_network = True

    def _teacher_network(self) -> nn.Module:
        return teacher_model(self.teacher, "input derivatives").eval()  # a user's loop may have called .train() on everything

    def __call__(self, student, x, y):
        c = self.config
        kd = dict(temperature=c.temperature, hard_weight=c.hard_weight, soft_weight=c.soft_weight,
                  soft=c.soft_loss, t2_scaling=c.t2_scaling, pseudo_labels=c.pseudo_labels)
        if c.derivative_weight == 0:  # plain KD: skip the three extra passes
            loss, parts = kd_loss(student(x), self.teacher(x), y, **kd)
            return loss, {**parts, "derivative": parts["soft"].new_zeros(())}
        f = partial(sobolev_target, target=c.target, temperature=c.temperature)
        v = random_unit_directions(x, c.directions)
        teacher_logits, teacher_jvp = directional_derivatives(self._teacher_network(), x, v, fn=f, create_graph=False)
        student_logits, student_jvp = directional_derivatives(student, x, v, fn=f, create_graph=True)
        loss, parts = kd_loss(student_logits, teacher_logits, y, **kd)
        derivative = sobolev_loss(student_jvp, teacher_jvp)
        return loss + c.derivative_weight * derivative, {**parts, "derivative": derivative.detach()}
