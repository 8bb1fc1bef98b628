"""Convolutions over the teacher's token ids, as a sentence classifier (Kim 2014) or a token tagger.

A non-recurrent sibling of BiLSTMText with the same constructor and inputs: every position is computed in parallel,
so it is the faster of the two on long inputs, at the price of a fixed context window.
"""

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from distill.students.text_embeddings import embedding_from_teacher


class TextCNNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["textcnn"] = "textcnn"
    embedding_dim: PositiveInt = 128
    channels: PositiveInt = Field(128, description="filters per kernel size (per layer, for the tagger)")
    kernel_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [3, 5], min_length=1,
        description="tagger: one stacked conv layer per size (window 1 + sum(k - 1)); classifier: parallel convs",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="on the embeddings and before the output layer")
    init_embeddings: bool = Field(True, description="start from the teacher's input embeddings when they are given")


class TextCNN(nn.Module):
    """Token level: stacked same-padded conv-ReLU layers, so each position sees a window of 1 + sum(k - 1) tokens
    (7 for [3, 5]), then a linear layer at inputs["word_mask"] positions: [N, num_classes] in row-major order.
    Sentence level (Kim 2014): one conv per kernel size in parallel, each max-pooled over the real positions, then
    concatenated into a linear layer. Same padding rather than Kim's narrow convs, so a sentence shorter than a
    kernel still has outputs.

    Padding never changes a row's output: pad positions are zeroed before every conv (exactly what same-padding
    puts beyond the ends) and set to -inf before the max-pool. So left- and right-padded batches both work."""

    def __init__(self, config: TextCNNConfig, *, vocab_size: int, num_classes: int, pad_id: int, token_level: bool,
                 teacher_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.config, self.token_level = config, token_level
        teacher = teacher_embeddings if config.init_embeddings else None
        self.embedding = embedding_from_teacher(vocab_size, config.embedding_dim, pad_id, teacher)
        self.dropout = nn.Dropout(config.dropout)
        widths = [config.embedding_dim] + [config.channels] * (len(config.kernel_sizes) - 1)
        if not token_level:
            widths = [config.embedding_dim] * len(config.kernel_sizes)
        self.convs = nn.ModuleList(
            nn.Conv1d(width, config.channels, k, padding="same") for width, k in zip(widths, config.kernel_sizes)
        )
        features = config.channels * (1 if token_level else len(config.kernel_sizes))
        self.head = nn.Linear(features, num_classes)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        real = inputs["attention_mask"].bool()[:, None, :]  # [B, 1, L], broadcast over channels
        x = self.dropout(self.embedding(inputs["input_ids"])).transpose(1, 2).masked_fill(~real, 0.0)  # [B, D, L]
        if self.token_level:
            for conv in self.convs:
                x = torch.relu(conv(x)).masked_fill(~real, 0.0)
            return self.head(self.dropout(x.transpose(1, 2)[inputs["word_mask"]]))
        pooled = [torch.relu(conv(x)).masked_fill(~real, float("-inf")).amax(2) for conv in self.convs]
        # A row with no real token would pool to -inf: give it zeros (the bias alone decides) instead of NaN.
        pooled = torch.cat(pooled, 1).masked_fill(~real.any(2), 0.0)
        return self.head(self.dropout(pooled))
