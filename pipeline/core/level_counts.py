"""Exact pixel counts of uint8-quantised probs, the ground of the threshold search.

One histogram of the 256 prob levels per class map, split into pixels outside and
inside the truth, gives by reverse cumulative sums the predicted area and the
intersection at every threshold level; ``dice_from_counts`` turns such counts into the
Kaggle Dice.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from pipeline.core.probstore import QUANTISATION

_LEVELS = QUANTISATION + 1
# cv2.calcHist counts in float32, exact below 2**24; np.bincount beyond that.
_CALCHIST_MAX_VALUES = 2**24


def _histogram(codes: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_bins,) int64 counts of the uint16 ``codes`` (any shape, values < n_bins).

    cv2.calcHist is about 3x faster than np.bincount, which first widens every code
    to int64; its float32 counts are exact while there are fewer than 2**24 codes.
    """
    if 0 < codes.size < _CALCHIST_MAX_VALUES:
        rows = np.ascontiguousarray(codes).reshape(-1, codes.shape[-1])
        counts = cv2.calcHist([rows], [0], None, [n_bins], [0, n_bins])
        return counts.ravel().astype(np.int64)
    return np.bincount(codes.ravel(), minlength=n_bins)


def class_histograms(q: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(C, 2, 256) int64 level counts of each class map: outside the truth, then inside.

    ``q`` (C, H, W) uint8 quantised probs, ``truth`` (C, H, W) uint8 {0, 1} (not
    checked here). One histogram for all classes: code = class * 512 + truth * 256 + level.
    """
    c = q.shape[0]
    codes = np.left_shift(truth, 8, dtype=np.uint16)
    codes |= q
    codes += (np.arange(c, dtype=np.uint16) * 2 * _LEVELS)[:, None, None]
    return _histogram(codes, c * 2 * _LEVELS).reshape(c, 2, _LEVELS)


def dice_from_counts(
    pred_area: np.ndarray, inter: np.ndarray, truth_area: np.ndarray
) -> np.ndarray:
    """Kaggle Dice from pixel counts (broadcasting int arrays) -> float64; 1 if both empty."""
    denom = pred_area + truth_area
    return np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))


def component_counts(
    q: np.ndarray, truth: np.ndarray, levels: Sequence[int], min_sizes: Sequence[int]
) -> np.ndarray:
    """(C, M * T, 2) int64: predicted area and intersection after component removal.

    For each class map of ``q`` (C, H, W) uint8 quantised, each threshold level
    ``levels[t]`` (on iff ``q >= level``) and each minimum size ``min_sizes[m]``, the
    8-connected components under ``min_sizes[m]`` pixels are removed (as
    ``postprocess.remove_small_components``; a size of 0 or 1 removes nothing), then the
    remaining area and its overlap with ``truth`` (C, H, W) uint8 {0, 1} are counted.
    Index ``m * T + t``: size-major. One labelling per class and level serves every size.
    """
    n_classes, n_levels = q.shape[0], len(levels)
    sizes = np.asarray(min_sizes, dtype=np.int64)
    out = np.zeros((n_classes, len(sizes), n_levels, 2), dtype=np.int64)
    for c in range(n_classes):
        on_truth = truth[c] > 0
        for t, level in enumerate(levels):
            if level > QUANTISATION:
                continue
            mask = (q[c] >= level).view(np.uint8)
            n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            if n <= 1:
                continue
            areas = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
            overlap = np.bincount(labels[on_truth], minlength=n)[1:]
            keep = areas[None, :] >= np.maximum(sizes, 1)[:, None]  # (M, n - 1)
            out[c, :, t, 0] = keep @ areas
            out[c, :, t, 1] = keep @ overlap
    return out.reshape(n_classes, len(sizes) * n_levels, 2)
