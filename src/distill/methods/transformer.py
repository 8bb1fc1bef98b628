"""Intermediate-layer distillation of transformers: hidden states, attention and embeddings (TinyBERT, DistilBERT, MiniLM).

    loss = KD(logits)                                                   (exactly as the `kd` method)
         + hidden_weight    · Σ_(i→j) HIDDEN(W_i H_s^(i), H_t^(j))       mse (TinyBERT) | cosine (DistilBERT)
         + attention_weight · Σ_(i→j) KL(A_t^(j) || A_s^(i))              (MiniLM; heads averaged when counts differ)
         + embedding_weight · MSE(W_e E_s, E_t)                          (TinyBERT's embedding layer)
over the real (unpadded) tokens; the sums run over the pairs of layer_map (student layer i -> teacher layer j,
0-based encoder layers; H^(i) is the output of layer i, A^(i) its attention probabilities, E the embedding output).
W_i, W_e are learned Linear projections, used only when the widths differ (TinyBERT's W_h); the cosine loss needs
equal widths. Without layer_map, student layer i maps to teacher layer round((i + 1) · L_t / L_s) - 1 (TinyBERT's
uniform strategy; with hf-shrink's `layers: [0, 2, 4]` give `layer_map: {0: 0, 1: 2, 2: 4}` to pair copied layers).
Teacher and student must be transformers models (model.kind hf or hf-shrink); attention needs eager attention,
which this method switches on.
"""

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from distill.errors import UserError
from distill.features import teacher_model
from distill.losses.kd import kd_loss
from distill.losses.transformer import attention_kl, embedding_mse, hidden_cosine, hidden_mse
from distill.methods.base import Method, register
from distill.methods.kd import KDConfig


class TransformerConfig(KDConfig):
    method: Literal["transformer"] = "transformer"
    layer_map: dict[int, int] | None = Field(None, description="student layer -> teacher layer, 0-based (default: uniform)")
    hidden_loss: Literal["mse", "cosine"] = Field("mse", description="mse (TinyBERT, projected) or cosine (DistilBERT)")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the hidden-state term")
    attention_weight: float = Field(0.0, ge=0, description="weight of the attention-distribution KL")
    embedding_weight: float = Field(0.0, ge=0, description="weight of the embedding-layer MSE")


def _hf(model: nn.Module, role: str) -> nn.Module:
    inner = getattr(model, "module", model)  # DDP keeps the model in .module
    hf = getattr(inner, "hf", None)
    if hf is None:
        raise UserError(f"distill.method=transformer reads hidden states and attention of transformers models, but the "
                        f"{role} is a {type(inner).__name__}: use model.kind hf or hf-shrink, or method hints for other models")
    return hf


def _layers(hf: nn.Module) -> int:
    return int(hf.config.num_hidden_layers)


@register
class Transformer(Method):
    name = "transformer"
    summary = "KD + hidden-state MSE/cosine, attention KL and embedding MSE on mapped transformer layers (TinyBERT/MiniLM)."
    Config = TransformerConfig
    reads_teacher_network = True  # hidden states and attention of the live teacher

    @classmethod
    def check(cls, config, teacher, student) -> dict[int, int]:
        """Both networks are transformers and every pair of the layer map exists; returns the map."""
        s_hf, t_hf = _hf(student, "student"), _hf(teacher, "teacher")
        ls, lt = _layers(s_hf), _layers(t_hf)
        layer_map = config.layer_map or {i: round((i + 1) * lt / ls) - 1 for i in range(ls)}
        for i, j in layer_map.items():
            if not 0 <= i < ls:
                raise UserError(f"distill.layer_map: student layer {i} does not exist: valid student layers are 0..{ls - 1}")
            if not 0 <= j < lt:
                raise UserError(f"distill.layer_map: teacher layer {j} does not exist: valid teacher layers are 0..{lt - 1}")
        ds, dt = int(s_hf.config.hidden_size), int(t_hf.config.hidden_size)
        if ds != dt and config.hidden_loss == "cosine" and config.hidden_weight > 0:
            raise UserError(f"distill.hidden_loss=cosine needs equal widths, but the student's hidden size is {ds} and "
                            f"the teacher's {dt}: use hidden_loss mse (a learned projection)")
        return layer_map

    def setup(self, student, example):
        c = self.config
        teacher = teacher_model(self.teacher, "hidden states")
        self.map = self.check(c, teacher, student)
        s_hf, t_hf = _hf(student, "student"), _hf(teacher, "teacher")
        if c.attention_weight > 0:
            for hf in (s_hf, t_hf):
                hf.set_attn_implementation("eager")  # sdpa does not return attention probabilities
        ds, dt = int(s_hf.config.hidden_size), int(t_hf.config.hidden_size)
        if ds != dt:
            device = next(student.parameters()).device
            self.modules["hidden"] = nn.ModuleDict({str(i): nn.Linear(ds, dt) for i in self.map}).to(device)
            self.modules["embedding"] = nn.Linear(ds, dt).to(device)

    def _project(self, key: str, h: torch.Tensor, i: int | None = None) -> torch.Tensor:
        if key not in self.modules:
            return h
        return self.modules[key][str(i)](h) if i is not None else self.modules[key](h)

    def __call__(self, student, x, y):
        c = self.config
        if not hasattr(self, "map"):
            self.setup(student, x)
        attn = c.attention_weight > 0
        teacher = teacher_model(self.teacher, "hidden states")
        with torch.inference_mode():
            t_logits, t_out = teacher.eval()(x, output_hidden_states=True, output_attentions=attn)
        # cloned outside inference mode: normal tensors that the student's losses may save for backward
        t_logits, t_hidden = t_logits.clone(), [h.clone() for h in t_out.hidden_states]
        t_attn = [a.clone() for a in t_out.attentions] if attn else None
        s_logits, s_out = student(x, output_hidden_states=True, output_attentions=attn)
        loss, parts = kd_loss(s_logits, t_logits, y, temperature=c.temperature, hard_weight=c.hard_weight,
                              soft_weight=c.soft_weight, soft=c.soft_loss, t2_scaling=c.t2_scaling,
                              pseudo_labels=c.pseudo_labels)
        mask = x["attention_mask"]
        if c.hidden_weight > 0:
            fn = hidden_mse if c.hidden_loss == "mse" else hidden_cosine
            hidden = sum(fn(self._project("hidden", s_out.hidden_states[i + 1], i), t_hidden[j + 1], mask) for i, j in self.map.items())
            loss, parts["hidden"] = loss + c.hidden_weight * hidden, hidden.detach()
        if attn:
            attention = sum(attention_kl(s_out.attentions[i], t_attn[j], mask) for i, j in self.map.items())
            loss, parts["attention"] = loss + c.attention_weight * attention, attention.detach()
        if c.embedding_weight > 0:
            emb = embedding_mse(self._project("embedding", s_out.hidden_states[0]), t_hidden[0], mask)
            loss, parts["embedding"] = loss + c.embedding_weight * emb, emb.detach()
        return loss, parts
