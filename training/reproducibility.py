"""Randomness that depends only on (seed, epoch, step), so a resumed run repeats an uninterrupted one.

The data order of an epoch is a permutation seeded by ``(seed, epoch)``; dropout and drop path draw
from the global torch generator, which is re-seeded from ``(seed, step, process)`` before every
micro-batch. Neither depends on how many batches were drawn before, which is what a restart loses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for each tuple of non-negative keys (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_micro_batch(seed: int, micro_step: int, process_index: int) -> None:
    """Re-seed torch's global generator (CPU and accelerators) for one micro-batch's dropout and drop path."""
    torch.manual_seed(derive_seed(seed, micro_step, process_index))


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``range(num_examples)`` that is a function of ``(seed, epoch)`` alone.

    Accelerate shards the batches of this order across processes and calls ``set_epoch`` before each
    epoch (``DataLoaderShard.set_epoch``), so every process agrees on the order without communicating.
    ``on_epoch`` (the box transform's ``set_epoch``) follows it, before the epoch's loader workers start.
    """

    def __init__(self, num_examples: int, seed: int, on_epoch: Callable[[int], None] | None = None):
        if num_examples < 1:
            raise ValueError(f"cannot shuffle an empty dataset (num_examples={num_examples})")
        self.num_examples, self.seed, self.epoch, self.on_epoch = num_examples, seed, 0, on_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch).tolist())

    def __len__(self) -> int:
        return self.num_examples
