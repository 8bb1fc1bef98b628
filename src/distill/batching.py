"""Batches of similar length, so padding does not eat the compute of variable-length text.

A plain shuffle pads every batch to its longest row: on the en-es pairs (mean 21 tokens, cut at 64) a batch of 64
is about 2.5x its real tokens. `LengthGroupedBatches` shuffles the rows, cuts the shuffle into windows of
`window` batches, sorts each window by length and cuts it into batches, then shuffles the batches. Every row is
seen once per epoch, the number of batches is that of a plain BatchSampler (windows hold whole batches, so only
the last batch can be short), and the order depends only on the generator: an epoch is reproducible and resumable.
"""

import numpy as np
import torch
from torch.utils.data import Sampler


class LengthGroupedBatches(Sampler[list[int]]):
    def __init__(self, lengths, batch_size: int, generator: torch.Generator, window: int = 50):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.generator, self.window = batch_size, generator, window
        # Accelerate's batch-sampler sharding reads these two attributes of a BatchSampler-like sampler
        self.drop_last = False
        self.sampler = range(len(self.lengths))

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).numpy()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            part = order[start:start + span]
            part = part[np.argsort(-self.lengths[part], kind="stable")]  # longest first within the window
            batches += [part[i:i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


def row_lengths(data) -> np.ndarray | None:
    """Tokens per example when the dataset tells (`lengths()`: distill's text datasets), else None."""
    lengths = getattr(data, "lengths", None)
    return np.asarray(lengths()) if callable(lengths) else None
