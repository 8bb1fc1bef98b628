"""Per-token divergences for LLM distillation: forward / reverse KL, generalised JSD (GKD), skew KL (DistiLLM),
total variation; plain, chunked or fused from the final hidden states (for large vocabularies).

loss = hard_weight · (1/|L|)·Σ_{n ∈ L} CE(s_n, y_n) + soft_weight · (1/N)·Σ_n d_n
over the N rows of the batch (counted positions), L = the rows with a label (label −1 counts in the soft term
only). d_n = T²·D(p_T, p_S) of distill.losses.divergence (D: `divergence`, with beta for jsd, alpha for skew).

chunk_size rows at a time (distill.losses.chunked) keeps the loss's own memory at O(chunk_size × V) beyond the
logits and their gradient; None computes everything at once. fused: true starts from the final hidden states
and the output projection of both networks, so no [N, V] logits of either exist: both must expose
counted_hidden(inputs) -> [N, d] (the hidden states of exactly the rows their logits would have) and
output_projection() -> (weight [V, d], bias or None). It needs the live teacher network (not a cache); under DDP
the student's hidden states come through the wrapper's forward (forward(inputs, hidden=True)), so its gradient
synchronisation holds; FSDP, which shards the output layer's weight, is refused.

on_policy (GKD, Agarwal et al. 2024): that share of batches trains on completions the student samples itself from
the batch's prompts (`sample_completions(inputs, max_new_tokens, temperature) -> (inputs, y)` of the student
network), with the divergence to the teacher on exactly the generated tokens (no hard term: they carry no label); the loop counts those tokens when it
normalises the step (distill.train_step), so a step is a mean over the tokens actually generated.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from distill.errors import UserError
from distill.features import _unwrapped
from distill.losses.chunked import chunked_loss_sums, fused_loss_sums
from distill.methods.base import Method, MethodConfig, register
from distill.signals.live import to_dtype
from distill.training_state import is_sharded


class DivergenceConfig(MethodConfig):
    method: Literal["divergence"] = "divergence"
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tv"] = Field(
        "forward_kl", description="KL(p_T‖p_S), KL(p_S‖p_T), generalised JSD (beta), skew KL / skew reverse KL (alpha), total variation")
    beta: float = Field(0.5, gt=0, lt=1, description="jsd: weight of the teacher in the mixture M = beta·p_T + (1−beta)·p_S (TRL's beta)")
    alpha: float = Field(0.1, ge=0, lt=1, description="skew_kl / skew_rkl: weight of the first distribution in the mixture (DistiLLM's alpha)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of both distributions; the divergence is multiplied by T²")
    hard_weight: float = Field(0.0, ge=0, description="weight of the cross-entropy to the labels (labelled rows only)")
    soft_weight: float = Field(1.0, ge=0, description="weight of the mean divergence over the batch's rows")
    chunk_size: int | None = Field(1024, ge=1, description="rows (token positions) per chunk; null computes all rows at once")
    fused: bool = Field(False, description="from the final hidden states and output projections, never building [N, V] logits")
    on_policy: float = Field(0.0, ge=0, le=1, description="share of batches (lambda of GKD) whose completions the student "
                                                          "samples itself, scored by the teacher; the rest use the data's")
    max_new_tokens: int = Field(64, ge=1, description="on_policy: tokens the student samples per prompt at most")
    sample_temperature: float = Field(1.0, gt=0, description="on_policy: temperature of the student's sampling")

    @model_validator(mode="after")
    def _consistent(self):
        if self.hard_weight == 0 and self.soft_weight == 0:
            raise ValueError("hard_weight and soft_weight are both 0: set soft_weight > 0")
        if self.on_policy and self.soft_weight == 0:
            raise ValueError("on_policy samples sequences for the teacher to score: set soft_weight > 0")
        if self.fused and self.chunk_size is None:
            raise ValueError("fused: true works a chunk of rows at a time: set chunk_size (e.g. 1024)")
        return self


def _projection_of(model: nn.Module, role: str) -> nn.Module:
    """The (unwrapped) network with counted_hidden and output_projection, else a one-line UserError."""
    inner = _unwrapped(model)
    if not (callable(getattr(inner, "counted_hidden", None)) and callable(getattr(inner, "output_projection", None))):
        raise UserError(f"distill.fused=true needs the {role} to expose counted_hidden(inputs) and output_projection(), "
                        f"which {type(inner).__name__} does not: set distill.fused=false")
    return inner


def _teacher_network(signal) -> nn.Module:
    net = getattr(signal, "model", None)
    if not isinstance(net, nn.Module):
        raise UserError("distill.fused=true reads the teacher's final hidden states, which only the live teacher "
                        "network gives (not a teacher cache): set distill.fused=false or remove teacher.cache")
    return _projection_of(net, "teacher")


@register
class Divergence(Method):
    name = "divergence"
    summary = "Per-token forward/reverse KL, GKD's JSD(beta), DistiLLM's skew KL or TV, chunked or fused for large vocabularies."
    Config = DivergenceConfig

    @classmethod
    def reads_network(cls, config) -> bool:
        return bool(config.fused)  # fused reads the teacher's hidden states; otherwise logits suffice (a cache serves)

    @classmethod
    def check(cls, config, teacher, student) -> None:
        if config.on_policy and not callable(getattr(_unwrapped(student), "sample_completions", None)):
            raise UserError(f"distill.on_policy needs a student that samples completions (a causal LM), which "
                            f"{type(_unwrapped(student)).__name__} does not: set distill.on_policy=0")
        if config.fused:
            s, t = _projection_of(student, "student"), _projection_of(teacher, "teacher")
            vs, vt = s.output_projection()[0].shape[0], t.output_projection()[0].shape[0]
            if vs != vt:
                raise UserError(f"distill.fused=true: the student's output projection has {vs} rows (vocabulary) and "
                                f"the teacher's {vt}: they must be equal")

    def sample_batch(self, student, batch):
        """GKD's mixed regime: with probability on_policy the batch's completions are replaced by the student's own
        samples from the same prompts (no gradient through sampling), so the teacher scores what the student
        writes. The draw uses the global RNG, which resumable states restore."""
        c = self.config
        if not c.on_policy or float(torch.rand(())) >= c.on_policy:
            return batch
        if len(batch) != 2:
            raise UserError("distill.on_policy scores the student's own samples with the live teacher; a teacher cache "
                            "holds outputs for the data's sequences only: remove teacher.cache or set distill.on_policy=0")
        net = _unwrapped(student)
        was_training = net.training
        net.eval()
        with torch.no_grad():
            inputs, y = net.sample_completions(batch[0], max_new_tokens=c.max_new_tokens, temperature=c.sample_temperature)
        net.train(was_training)
        # the student's own tokens are no labels: only the divergence to the teacher trains on them (as GKD); the
        # loop still counts every generated token when it normalises the step
        return inputs, torch.full_like(y, -1)

    def __call__(self, student, x, y):
        c = self.config
        n, labelled = y.shape[0], int((y >= 0).sum())
        options = dict(kind=c.divergence, temperature=c.temperature, beta=c.beta, alpha=c.alpha,
                       soft_weights=c.soft_weight / max(n, 1), hard_weights=c.hard_weight / max(labelled, 1),
                       labels=y if c.hard_weight > 0 else None)
        if c.fused:
            sums = self._fused(student, x, options)
        else:
            # soft_weight 0: the teacher's logits would serve no term, so the teacher is not run
            teacher_logits = self.teacher(x) if c.soft_weight > 0 else None
            sums = chunked_loss_sums(student(x), teacher_logits, chunk_size=c.chunk_size, **options)
        return sums.total, {"hard": sums.hard / max(labelled, 1), "soft": sums.soft / max(n, 1)}

    def _fused(self, student, x, options):
        s_weight, s_bias = _projection_of(student, "student").output_projection()
        teacher = dict(teacher_hidden=None, teacher_weight=None, teacher_bias=None)
        if self.config.soft_weight > 0:
            net, dtype = _teacher_network(self.teacher), getattr(self.teacher, "dtype", None)
            with torch.no_grad():
                hidden = net.eval().counted_hidden(x if dtype is None else to_dtype(x, dtype))
            t_weight, t_bias = net.output_projection()
            teacher = dict(teacher_hidden=hidden, teacher_weight=t_weight, teacher_bias=t_bias)
        return fused_loss_sums(_student_hidden(student, x), s_weight, s_bias, **teacher,
                               chunk_size=self.config.chunk_size, **options)


def _student_hidden(student: nn.Module, x) -> torch.Tensor:
    """The student's counted hidden states; under DDP through the wrapper's forward (forward(x, hidden=True)), so
    that DDP prepares and synchronises the gradients, the output layer's included (it shares the parameters)."""
    inner = _unwrapped(student)
    if inner is student:
        return student.counted_hidden(x)
    if is_sharded(student):
        raise UserError("distill.fused=true reads the output layer's weight outside the forward pass, which FSDP "
                        "shards: use DDP, or set distill.fused=false")
    if "hidden" not in inspect.signature(inner.forward).parameters:
        raise UserError(f"distill.fused=true under DDP needs the student's forward to take hidden=True (return "
                        f"counted_hidden), which {type(inner).__name__}.forward does not: set distill.fused=false")
    return student(x, hidden=True)
