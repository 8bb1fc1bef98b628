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
from distill.students.text_embeddings import embedding_from_teacher


class BiLSTMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["bilstm"] = "bilstm"
    embedding_dim: PositiveInt = 128
    hidden: PositiveInt = Field(128, description="units per direction")
    layers: PositiveInt = 1
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="on the embeddings, between layers and before the output")
    init_embeddings: bool = Field(True, description="start from the teacher's input embeddings when they are given")


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
