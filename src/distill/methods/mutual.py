"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018, "Deep Mutual Learning").

K = peers + 1 students learn together; each one also matches the others' (detached) predictions:

    L_k   = CE(z_k, y) + kl_weight / (K-1) · Σ_{j≠k} T²·KL(sg(p_j) || p_k) [+ teacher_weight · T²·KL(p_t || p_k)]
    loss  = Σ_k L_k,      p_j = softmax(z_j / T)                 (distill.losses.mutual.mutual_loss)

Student 1 is the trainer's student; the K-1 peers are built in `setup` as copy.deepcopy(student) followed by
reset_parameters() on every submodule that has one, so they share the architecture but not the initial weights
(submodules without reset_parameters, e.g. custom layers, keep the student's values; the reset uses a seed
derived from torch.initial_seed() and the peer's index, so runs are reproducible). They live in
`self.modules`, so the trainer optimises them with the same optimizer and keeps them in checkpoints; only
the student is evaluated and exported. A model's apply_constraints() (max-norm) is applied to the peers
before each of their forwards, since the trainer only constrains the student.

The paper updates the students in turn within a step (student 2 sees student 1's already-updated
prediction); here all K predictions come from one forward and one backward of the summed loss updates all
students at once. Because every KL target is detached, each student still gets exactly the gradient of its
own L_k; only the order within a step differs. With use_teacher the fixed teacher is one more target for
every student (the paper's teacher-free setting is use_teacher: false).
"""

import copy
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from distill.errors import UserError
from distill.losses.mutual import mutual_loss
from distill.methods.base import Method, MethodConfig, register


class MutualConfig(MethodConfig):
    method: Literal["mutual"] = "mutual"
    peers: int = Field(1, ge=1, description="number of peer students trained alongside the student (K = peers + 1)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of the KL terms (the paper uses 1)")
    kl_weight: float = Field(1.0, ge=0, description="weight of the mean KL to the peers' predictions")
    use_teacher: bool = Field(True, description="also match the (fixed) teacher's prediction, as an extra peer")
    teacher_weight: float = Field(1.0, ge=0, description="weight of the KL to the teacher (when use_teacher)")


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """Same architecture, new initial weights: deepcopy, then reset_parameters() wherever a submodule has it.

    The reset draws from its own seed inside a forked RNG: the trainer calls set_seed(seed) right before
    setup, so resetting from the global RNG would replay the student's own initialisation (identical peers),
    and it would also shift the dropout/shuffle stream the student sees.
    """
    peer = copy.deepcopy(model)
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        for module in peer.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return peer


@register
class Mutual(Method):
    name = "mutual"
    summary = "Deep mutual learning: student + peers each minimise CE + mean KL to the others (+ KL to the teacher)."
    Config = MutualConfig

    def setup(self, student, example):
        base = torch.initial_seed()  # reproducible: the same run seed gives the same peers
        self.modules["peers"] = nn.ModuleList(
            fresh_copy(student, (base + 7919 * (i + 1)) % 2**63) for i in range(self.config.peers)
        )

    def __call__(self, student, x, y):
        c = self.config
        if "peers" not in self.modules:
            raise UserError(
                "mutual: the peer students do not exist yet; call method.setup(student, x) once before building "
                "the optimizer (the built-in fit does this; with Distiller in your own loop: d.method.setup(d.student, x))"
            )
        logits = [student(x)]
        for peer in self.modules["peers"]:
            constrain = getattr(peer, "apply_constraints", None)
            if constrain is not None:
                constrain()
            logits.append(peer(x))
        teacher_logits = self.teacher(x) if c.use_teacher else None
        return mutual_loss(
            logits, y, temperature=c.temperature, kl_weight=c.kl_weight,
            teacher_logits=teacher_logits, teacher_weight=c.teacher_weight,
        )
