"""Micro-batches by token budget: whole rows packed into bins of at most `train.pack_length` tokens.

With `train.pack_length`, a micro-batch is `micro_batch_size` bins rather than that many rows, so
every forward pass holds nearly the same number of tokens (the bins are full) instead of anything
from a few hundred to 16 x 512. Memory is then sized by the budget, not the longest rows, and
data-parallel processes get equal work. Rows are never split: a bin holds whole rows, which the
collator keeps apart (per-row positions and attention).
"""

from __future__ import annotations

import bisect
import math

import torch


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into bins of at most `capacity` tokens (best-fit decreasing).

    Longest rows first, each into the fullest bin it still fits; about as few bins as possible, and
    the same bins for the same lengths.
    """
    too_long = next((i for i, n in enumerate(lengths) if n > capacity), None)
    if too_long is not None:
        raise ValueError(f"row {too_long} has {lengths[too_long]} tokens, more than train.pack_length = {capacity}")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin number), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(room, (lengths[i], -1))  # the bin with the least room that still fits
        if at == len(room):
            bins.append([i])
            left, number = capacity - lengths[i], len(bins) - 1
        else:
            left, number = room.pop(at)
            bins[number].append(i)
            left -= lengths[i]
        bisect.insort(room, (left, number))
    return bins


class PackedBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of `bins_per_batch` bins (their rows' indices), bins in a new order each epoch.

    The bins are fixed (so the number of micro-batches per epoch is too, which the Trainer relies
    on); their order is shuffled from `seed` and the epoch, so a resumed run sees the same order.
    """

    def __init__(self, lengths: list[int], capacity: int, bins_per_batch: int, seed: int) -> None:
        self.bins = pack_rows(lengths, capacity)
        self.bins_per_batch = bins_per_batch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.bins) / self.bins_per_batch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.bins), generator=generator).tolist()
        for start in range(0, len(order), self.bins_per_batch):
            yield [row for b in order[start : start + self.bins_per_batch] for row in self.bins[b]]
