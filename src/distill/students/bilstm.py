"""Bidirectional LSTM over the teacher's token ids, as a sentence classifier or a token tagger.

The small recurrent student of NLP Architect's NeuralTagger / tagger_kd: ~3-4M parameters, mostly embeddings, about
10x faster than BERT. It reads the teacher tokenizer's ids, so teacher and student predict at the same positions and
its embeddings can start from the teacher's (`embedding_from_teacher`, shared with TextCNN).
"""

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from distill.errors import UserError


class BiLSTMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["bilstm"] = "bilstm"
    embedding_dim: PositiveInt = 128
    hidden: PositiveInt = Field(128, description="units per direction")
    layers: PositiveInt = 1
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="on the embeddings, between layers and before the output")
    init_embeddings: bool = Field(True, description="start from the teacher's input embeddings when they are given")


def embedding_from_teacher(vocab_size: int, dim: int, pad_id: int, teacher: torch.Tensor | None) -> nn.Embedding:
    """nn.Embedding(vocab_size, dim, padding_idx=pad_id), started from the teacher's [V, D_t] input embeddings if given.

    D_t == dim: an exact copy (the pad row included; padding_idx keeps it frozen and both models mask pad positions).
    Otherwise the centred teacher rows are projected onto its top-`dim` principal axes, found exactly from the
    D_t x D_t scatter matrix in float64 (eigh: deterministic, ~1 s for 30522 x 768, where an SVD of the whole matrix
    takes ~6 s). By Eckart-Young this keeps the teacher's pairwise inner products (centred Gram matrix) best in the
    least-squares sense of any `dim`-wide embedding. Each axis's sign is fixed (largest entry positive), and one scalar
    then rescales the rows so their std equals the teacher's. When dim exceeds the axes available (min(V, D_t)), the
    extra columns get small random values (normal, std 1% of the teacher's): near zero, but not all-equal dead columns.
    """
    embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
    if teacher is None:
        return embedding
    if teacher.ndim != 2 or teacher.shape[0] != vocab_size:
        raise UserError(
            f"teacher embeddings have shape {tuple(teacher.shape)} but the student's vocab_size is {vocab_size}; "
            "pass vocab_size = the teacher's embedding rows (may exceed len(tokenizer)) "
            "or set model.init_embeddings: false"
        )
    with torch.no_grad():
        if teacher.shape[1] == dim:
            embedding.weight.copy_(teacher)
            return embedding
        rows = teacher.detach().to("cpu", torch.float64)
        centred = rows - rows.mean(0)
        _, axes = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues: flip to take the largest first
        axes = axes.flip(1)[:, : min(dim, *rows.shape)]
        axes = axes * torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
        projected = centred @ axes
        std = rows.std()
        projected = projected * (std / projected.std())
        extra = torch.randn(vocab_size, dim - projected.shape[1], dtype=torch.float64) * (0.01 * std)
        embedding.weight.copy_(torch.cat([projected, extra], dim=1))
    return embedding


class BiLSTMText(nn.Module):
    """Token level: logits at inputs["word_mask"] positions, [N, num_classes] in row-major order.
    Sentence level: masked max-pool over time of the top layer's outputs, then a linear layer. Max-pooling rather than
    the final forward/backward states: it was the best BiLSTM sentence encoder in Conneau et al. 2017 (InferSent), it
    does not squeeze a long sentence through one state, and it sends gradient to every position."""

    def __init__(self, config: BiLSTMConfig, *, vocab_size: int, num_classes: int, pad_id: int, token_level: bool,
                 teacher_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.config, self.token_level = config, token_level
        teacher = teacher_embeddings if config.init_embeddings else None
        self.embedding = embedding_from_teacher(vocab_size, config.embedding_dim, pad_id, teacher)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(config.embedding_dim, config.hidden, num_layers=config.layers, batch_first=True,
                            bidirectional=True, dropout=config.dropout if config.layers > 1 else 0.0)
        self.head = nn.Linear(2 * config.hidden, num_classes)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Packed by length, so a row's output does not depend on how far it is padded. Rows must be right-padded
        (real tokens first); a row with no real token is read as its first token, so it still gives finite logits."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        lengths = mask.sum(1).clamp(min=1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        if bool((mask & (positions >= lengths[:, None])).any()):
            raise UserError("model.kind bilstm needs right-padded inputs; set the tokenizer's padding_side to 'right'")
        packed = pack_padded_sequence(self.dropout(self.embedding(ids)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        states, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=ids.shape[1])
        if self.token_level:
            return self.head(self.dropout(states[inputs["word_mask"]]))
        real = positions < lengths[:, None]
        pooled = states.masked_fill(~real[:, :, None], float("-inf")).amax(1)
        return self.head(self.dropout(pooled))
