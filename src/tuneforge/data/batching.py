"""Epoch-seeded batch sampling, optionally grouping examples of similar length.

Why our own sampler: the order of epoch ``e`` depends only on ``(seed, e)``,
which makes runs repeatable and (later) lets a resumed run continue from the
exact batch. Length grouping cuts padding: SST-2 sentences vary from 2 to 60
tokens, and padding every batch to its longest member wastes most compute
when lengths are mixed (the HF Trainer's ``group_by_length`` idea).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0,
                 lengths: list[int] | None = None, group_by_length: bool = False, megabatch: int = 50,
                 keyed: bool = False):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.lengths = lengths
        self.group = group_by_length and lengths is not None and shuffle
        self.megabatch = megabatch
        self.keyed = keyed  # yield (epoch, index) keys, for per-item seeded augmentation
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch``'s order; skip its first ``start`` batches (exact resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        n = math.ceil(self.n / self.batch_size)
        folded = self.shuffle and n > 1 and self.n % self.batch_size == 1  # see _no_singletons
        return n - 1 if folded else n

    def __iter__(self):
        for batch in self.batches()[self.start:]:
            yield [(self.epoch, i) for i in batch] if self.keyed else batch

    def batches(self) -> list[list[int]]:
        if not self.shuffle:
            order = list(range(self.n))
            if self.lengths is not None:
                # Evaluation: longest first, so padding is minimal and a too-large
                # batch fails at once rather than at the end.
                order.sort(key=lambda i: -self.lengths[i])
            return [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if not self.group:
            return _no_singletons([order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)])
        # Sort within random mega-batches (keeps randomness), then shuffle the batches.
        size = self.batch_size * self.megabatch
        batches = []
        for start in range(0, self.n, size):
            chunk = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            batches.extend(chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        return _no_singletons([batches[j] for j in torch.randperm(len(batches), generator=g).tolist()])


def _no_singletons(batches: list[list[int]]) -> list[list[int]]:
    """A training batch of one breaks BatchNorm ("expected more than 1 value per
    channel") and gives a noisy step; fold it into another batch instead of
    dropping the example."""
    for i, b in enumerate(batches):
        if len(b) == 1 and len(batches) > 1:
            other = batches[i - 1] if i else batches[1]
            other.extend(b)
            return [x for x in batches if x is not b]
    return batches
