"""Truth masks straight from RLE at a smaller size, without decoding the full mask (pure).

``decode_truth`` equals ``masks.truth_masks`` (decode, then nearest-neighbour resize)
transposed to (C, H, W); tested against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from pipeline.core.masks import MASK_INTERPOLATION
from pipeline.core.rle import decode


def decode_truth(
    rles: Sequence[str], original_shape: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """Truth (C, H, W) uint8 {0, 1} at ``size``: ``masks.truth_masks`` transposed, faster.

    ``rles`` are already validated (``mask_csv.read_masks``). Rather than decoding every
    mask at its original size (1400x2100 for Clouds) and resizing it, the runs are
    counted directly at the original pixels the nearest-neighbour resize samples.
    """
    height, width = size
    out = np.zeros((len(rles), height, width), dtype=np.uint8)
    if tuple(original_shape) == tuple(size):
        for c, text in enumerate(rles):
            if text.strip():
                out[c] = decode(text, original_shape)
        return out
    grid = _sampling(tuple(original_shape), (height, width))
    n_pixels = original_shape[0] * original_shape[1]
    n_sampled = grid.n_rows * grid.n_cols
    for c, text in enumerate(rles):
        if not text.strip():
            continue
        # Run starts (0-based) and ends, alternately.
        bounds = np.fromstring(text, dtype=np.int64, sep=" ")
        bounds[0::2] -= 1
        bounds[1::2] += bounds[0::2]
        if bounds[-1] > n_pixels:
            raise ValueError(
                f"rle of class {c} runs to pixel {bounds[-1]}, past the end of a "
                f"{original_shape[0]}x{original_shape[1]} image ({n_pixels} pixels)"
            )
        # Sampled pixels before each run boundary (column-major: whole sampled columns
        # first, then sampled rows of its own column) give the runs' lengths in sampled
        # pixels, alternately background and foreground.
        col, row = np.divmod(bounds, original_shape[0])
        before = grid.col_rank[col] * grid.n_rows + grid.col_sampled[col] * grid.row_rank[row]
        counts = np.empty(before.size + 1, dtype=np.int64)
        counts[0] = before[0]
        np.subtract(before[1:], before[:-1], out=counts[1:-1])
        counts[-1] = n_sampled - before[-1]
        values = np.zeros(counts.size, dtype=np.uint8)
        values[1::2] = 1
        sampled = np.repeat(values, counts).reshape(grid.n_cols, grid.n_rows)
        if grid.one_to_one:
            cv2.transpose(sampled, dst=out[c])  # faster than numpy's strided copy
        else:
            out[c] = sampled.T[np.ix_(grid.row_map, grid.col_map)]
    return out


@dataclass(frozen=True)
class _Sampling:
    """Which original rows and columns a nearest resize reads, and where they go.

    ``row_rank[r]``: sampled rows above row r (r in [0, H]); ``col_rank``, the same for
    columns; ``col_sampled[x]``: 1 if column x is read; ``row_map``/``col_map``: for
    each target row/column, its source's index among the sampled ones.
    """

    n_rows: int
    n_cols: int
    row_rank: np.ndarray
    col_rank: np.ndarray
    col_sampled: np.ndarray
    row_map: np.ndarray
    col_map: np.ndarray
    one_to_one: bool


@lru_cache(maxsize=8)
def _sampling(original_shape: tuple[int, int], size: tuple[int, int]) -> _Sampling:
    rows, row_map = np.unique(_nearest_indices(original_shape[0], size[0]), return_inverse=True)
    cols, col_map = np.unique(_nearest_indices(original_shape[1], size[1]), return_inverse=True)
    row_read = np.zeros(original_shape[0] + 1, dtype=np.int64)
    row_read[rows] = 1
    col_read = np.zeros(original_shape[1] + 1, dtype=np.int64)
    col_read[cols] = 1
    return _Sampling(
        n_rows=rows.size,
        n_cols=cols.size,
        row_rank=np.cumsum(row_read) - row_read,
        col_rank=np.cumsum(col_read) - col_read,
        col_sampled=col_read,
        row_map=row_map,
        col_map=col_map,
        one_to_one=(rows.size, cols.size) == tuple(size),
    )


def _nearest_indices(n_source: int, n_target: int) -> np.ndarray:
    """Source index that ``masks.resize_masks`` picks for each target index along one
    axis; cv2 itself computes them, so they match exactly."""
    source = np.arange(n_source, dtype=np.float32)[None, :]
    picked = cv2.resize(source, (n_target, 1), interpolation=MASK_INTERPOLATION)
    return picked[0].astype(np.int64)
