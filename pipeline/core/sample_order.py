"""Which image the n-th training sample is: a pure function of (seed, n).

The training stream visits the fold's images in passes; pass ``p`` is a permutation
drawn from ``(seed, p)``. Sample ``n`` is position ``n % N`` of pass ``n // N``, so any
sample can be found without replaying the stream: a run resumed at epoch ``e`` (or a new
unfreezing phase) starts at sample ``e * steps_per_epoch * global_batch`` and sees
exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np


def batches_per_pass(n_images: int, batch: int) -> int:
    """Batches in one pass over ``n_images``: every image at least once, so the last
    batch is filled from the next pass rather than dropped (a fold of 354 images in
    batches of 8 trains 45 batches an epoch, as a Keras ``Sequence`` of ``ceil(n / b)``
    batches does, not 44)."""
    return max(1, -(-int(n_images) // max(1, int(batch))))


class SampleOrder:
    """``order(n)``: the cache row of training sample ``n`` (int64 ``n >= 0``)."""

    def __init__(self, indices: Sequence[int] | np.ndarray, seed: int) -> None:
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.indices.size == 0:
            raise ValueError("indices must not be empty: a fold needs training images")
        self.seed = int(seed)
        self._lock = threading.Lock()
        self._passes: dict[int, np.ndarray] = {}

    def permutation(self, pass_index: int) -> np.ndarray:
        """The cache rows in the order of pass ``pass_index``."""
        with self._lock:
            order = self._passes.get(pass_index)
            if order is None:
                rng = np.random.default_rng([self.seed, int(pass_index)])
                order = self.indices[rng.permutation(self.indices.size)]
                if len(self._passes) >= 4:  # the parallel map spans two passes at most
                    self._passes.pop(min(self._passes))
                self._passes[pass_index] = order
            return order

    def __call__(self, n: int | np.integer) -> np.int64:
        n = int(n)
        if n < 0:
            raise ValueError(f"sample number must be >= 0; got {n}")
        size = self.indices.size
        return np.int64(self.permutation(n // size)[n % size])


def first_sample(epoch: int, steps_per_epoch: int, global_batch: int) -> int:
    """The number of the first sample of (0-based) ``epoch``."""
    return int(epoch) * int(steps_per_epoch) * int(global_batch)
