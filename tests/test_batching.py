"""Length-grouped batches: every row once per epoch, as many batches as a plain sampler, less padding, reproducible."""

import numpy as np
import torch

from distill.batching import LengthGroupedBatches
from distill.train import make_loader
from distill.data.text import TokenizedText


def _batches(lengths, batch_size, seed, window=50):
    return list(LengthGroupedBatches(lengths, batch_size, torch.Generator().manual_seed(seed), window=window))


def test_every_row_once_and_the_batch_count_of_a_plain_sampler():
    lengths = np.random.default_rng(0).integers(1, 64, size=1003)
    batches = _batches(lengths, 32, seed=1, window=4)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert len(batches) == len(LengthGroupedBatches(lengths, 32, torch.Generator())) == -(-1003 // 32)
    assert sorted(len(b) for b in batches)[1:] == [32] * (len(batches) - 1)  # only one short batch


def test_padding_shrinks_against_a_plain_shuffle():
    lengths = np.random.default_rng(0).integers(1, 64, size=4096)
    grouped = sum(len(b) * lengths[b].max() for b in _batches(lengths, 64, seed=0))
    order = np.random.default_rng(0).permutation(4096)
    plain = sum(64 * lengths[order[i:i + 64]].max() for i in range(0, 4096, 64))
    assert grouped < 0.7 * plain, (grouped, plain)


def test_order_depends_only_on_the_generator():
    lengths = np.arange(500) % 37
    assert _batches(lengths, 16, seed=3) == _batches(lengths, 16, seed=3)
    assert _batches(lengths, 16, seed=3) != _batches(lengths, 16, seed=4)


def test_text_rows_are_grouped_when_asked():
    ids = [[5] * (1 + i % 40) for i in range(400)]
    data = TokenizedText(ids, torch.zeros(400, dtype=torch.long), pad_id=0)
    grouped = make_loader(data, 40, torch.Generator().manual_seed(0), group_by_length=True)
    plain = make_loader(data, 40, torch.Generator().manual_seed(0))
    assert isinstance(grouped.batch_sampler, LengthGroupedBatches)
    assert not isinstance(plain.batch_sampler, LengthGroupedBatches)
    pad = lambda loader: sum(int((x["attention_mask"] == 0).sum()) for x, _ in loader)  # noqa: E731
    assert pad(grouped) < pad(plain) / 2
