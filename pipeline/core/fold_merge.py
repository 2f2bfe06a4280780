"""The fold merge of prediction: a memory-mapped, fixed-point running merge over folds.

``FoldAccumulator`` folds every fold's probs (N, H, W, C) into integer codes on disk
(``tta.merge``: mean, gmean or max) and gives back the merged float probs, off the
float merge (``tta.merge_arrays``) by at most ``MERGE_TOLERANCE``. Pure: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.probstore import QUANTISATION
from pipeline.core.tta import GMEAN_EPS, MERGES

# The fold merge may be off the float merge by at most a quarter of a uint8 level, so
# quantising it gives the float result's level or a neighbour (only at a level's edge).
MERGE_TOLERANCE = 0.25 / QUANTISATION
# Largest -log(p) a geometric mean sees: probs are floored at GMEAN_EPS.
LOG_SPAN = -math.log(GMEAN_EPS)


class FoldAccumulator:
    """Running merge over folds of probs (N, H, W, C), kept on disk as fixed-point codes.

    Per fold, ``add`` turns a batch of float probs into integer codes and folds them in:
    sums of ``round(p * scale)`` (``mean``), sums of ``round(-log(max(p, eps)) * scale)``
    (``gmean``, eps = ``tta.GMEAN_EPS`` as in ``tta.merge_arrays``) or maxima of
    ``round(p * scale)`` (``max``). The codes live in a memory-mapped uint16 array (uint32
    when 16 bits cannot keep ``max_error`` under ``MERGE_TOLERANCE``): half the bytes of
    float32, which at Clouds scale (3,698 x 384 x 576 x 4) is 6.5 GB on disk instead of
    13 GB, and never all in RAM. ``scale`` is chosen so that no sum can overflow.
    """

    def __init__(self, path: Path, shape: Sequence[int], n_folds: int, how: str = "mean") -> None:
        if how not in MERGES:
            raise ValueError(f"how must be one of {', '.join(MERGES)}; got {how!r}")
        if n_folds < 1:
            raise ValueError(f"n_folds must be at least 1; got {n_folds}")
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"shape must be (N, H, W, C) positive; got {tuple(shape)}")
        self.path = Path(path)
        self.n_folds = n_folds
        self.how = how
        terms = 1 if how == "max" else n_folds
        span = LOG_SPAN if how == "gmean" else 1.0
        for dtype in (np.uint16, np.uint32):
            # Each code is at most cap, so `terms` codes sum to at most iinfo.max.
            self.cap = int(np.iinfo(dtype).max) // terms
            self.scale = math.floor(self.cap / span)
            self.dtype = np.dtype(dtype)
            if self.max_error <= MERGE_TOLERANCE:
                break
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._codes = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=self.dtype, shape=tuple(int(s) for s in shape)
        )
        self._added = np.zeros(int(shape[0]), dtype=np.int64)

    @property
    def max_error(self) -> float:
        """Bound on |merged prob - ``tta.merge_arrays`` of the same probs|."""
        half_step = 0.5 / self.scale
        return math.expm1(half_step) if self.how == "gmean" else half_step

    def add(self, start: int, probs: np.ndarray) -> None:
        """Fold in one fold's probs (B, H, W, C) float in [0, 1] of images start..start+B-1."""
        stop = start + len(probs)
        if probs.shape[1:] != self._codes.shape[1:] or not 0 <= start < stop <= len(self._added):
            raise ValueError(
                f"probs of images {start}..{stop - 1} must be (B, "
                f"{', '.join(map(str, self._codes.shape[1:]))}) within {len(self._added)} "
                f"images; got {probs.shape}"
            )
        if (self._added[start:stop] >= self.n_folds).any():
            raise ValueError(
                f"images {start}..{stop - 1} already hold all {self.n_folds} folds; "
                "cannot add another"
            )
        values = probs.astype(np.float32, copy=False)
        if self.how == "gmean":
            values = -np.log(np.maximum(values, np.float32(GMEAN_EPS)))
        codes = np.rint(values * np.float32(self.scale))
        # float32 rounding of -log(eps) may land one step past cap; clip keeps sums safe.
        np.clip(codes, 0, self.cap, out=codes)
        target = self._codes[start:stop]
        if self.how == "max":
            np.maximum(target, codes.astype(self.dtype), out=target)
        else:
            target += codes.astype(self.dtype)
        self._added[start:stop] += 1

    def merged(self, start: int, stop: int) -> np.ndarray:
        """The merge over all folds of images start..stop-1: (B, H, W, C) float32 in [0, 1]."""
        missing = np.flatnonzero(self._added[start:stop] != self.n_folds)
        if missing.size:
            row = start + int(missing[0])
            raise ValueError(
                f"image {row} holds {self._added[row]} of {self.n_folds} folds; "
                "predict every fold before merging"
            )
        codes = self._codes[start:stop].astype(np.float32)
        if self.how == "max":
            return codes / np.float32(self.scale)
        mean = codes / np.float32(self.scale * self.n_folds)
        return np.exp(-mean) if self.how == "gmean" else np.minimum(mean, np.float32(1.0))

    def close(self) -> None:
        """Drop the memory map and delete its file."""
        del self._codes
        self.path.unlink(missing_ok=True)
