"""Mutually exclusive classes (``model.activation: softmax``), pure numpy.

A softmax model scores C+1 channels per pixel, channel 0 the background; every stage
after the network keeps only the C foreground probabilities (``nn.model`` drops the
background channel), because the background is what they leave: ``1 - sum(p)``. The
TTA views, the fold merge and the OOF store therefore average and store C channels as
for a sigmoid model, and the sums stay exact (a mean of distributions is one).

A pixel's class is the argmax over the background and the C classes
(``argmax_masks``); void pixels (``data.ignore_index`` / ``data.ignore_color``) count
in no score: ``without_void`` empties truth and prediction there, so a Kaggle Dice of
the results is the same whatever was predicted or labelled at a void pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.core.rle_check import _is_empty, _parse_runs

SOFTMAX = "softmax"


def is_exclusive(activation: str) -> bool:
    """True for ``model.activation: softmax`` (one class per pixel)."""
    return str(activation) == SOFTMAX


def background(probs: np.ndarray) -> np.ndarray:
    """The background probability ``1 - sum(p)`` of (..., C) foreground probabilities,
    clipped to [0, 1] (quantised stores may sum a little above 1)."""
    return np.clip(1.0 - np.asarray(probs, dtype=np.float32).sum(axis=-1), 0.0, 1.0)


def labels(probs: np.ndarray) -> np.ndarray:
    """int (...,) class labels of (..., C) foreground probabilities: 0 background,
    ``c + 1`` class c; ties go to the lower label (background first)."""
    probs = np.asarray(probs, dtype=np.float32)
    full = np.concatenate([background(probs)[..., None], probs], axis=-1)
    return np.argmax(full, axis=-1)


def argmax_masks(probs: np.ndarray) -> np.ndarray:
    """(..., C) uint8 one-hot masks of the argmax class (all zero where background wins)."""
    n_classes = np.asarray(probs).shape[-1]
    return one_hot(labels(probs), n_classes)


def one_hot(label: np.ndarray, n_classes: int) -> np.ndarray:
    """(..., C) uint8 masks of int labels (0 background, ``c + 1`` class c)."""
    return (np.asarray(label)[..., None] == np.arange(1, n_classes + 1)).astype(np.uint8)


def mask_labels(masks: np.ndarray) -> np.ndarray:
    """int (...,) labels of (..., C) exclusive binary masks (0 where none is set)."""
    masks = np.asarray(masks) > 0
    return np.where(masks.any(axis=-1), np.argmax(masks, axis=-1) + 1, 0)


def without_void(masks: np.ndarray, void: np.ndarray | None) -> np.ndarray:
    """(..., H, W, C) ``masks`` (or probabilities) with every channel zeroed where the
    (..., H, W) ``void`` is set; unchanged when ``void`` is None."""
    if void is None:
        return masks
    keep = (np.asarray(void) == 0)[..., None]
    return np.where(keep, masks, 0).astype(np.asarray(masks).dtype)


def confusion_matrix(
    truth: np.ndarray, pred: np.ndarray, n_classes: int, void: np.ndarray | None = None
) -> np.ndarray:
    """(C+1, C+1) int64 pixel counts, rows the true label, columns the predicted one
    (0 background, ``c + 1`` class c), of int label maps of equal shape; pixels where
    ``void`` is set are not counted."""
    truth, pred = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction differ in size: {truth.size} and {pred.size}")
    if void is not None:
        keep = np.asarray(void).ravel() == 0
        truth, pred = truth[keep], pred[keep]
    size = n_classes + 1
    counts = np.bincount(truth.astype(np.int64) * size + pred.astype(np.int64), minlength=size**2)
    return counts.reshape(size, size)


def _runs(rle: str, where: str) -> np.ndarray:
    """(R, 2) int64 [start, end) pixel intervals of an RLE string."""
    if _is_empty(rle, where):
        return np.zeros((0, 2), dtype=np.int64)
    starts, lengths = _parse_runs(rle, where)
    return np.stack([starts, starts + lengths], axis=1)


def overlapping_pair(rles: Sequence[str], where: str = "RLE") -> tuple[int, int] | None:
    """The first pair of class indices (i < j) whose RLE masks share a pixel, else None.

    Works on the runs, without the image's shape: two classes overlap where one's
    interval starts before another's ends and after its start.
    """
    parts = [(c, _runs(rle, f"{where} of class {c}")) for c, rle in enumerate(rles)]
    parts = [(c, runs) for c, runs in parts if len(runs)]
    if len(parts) < 2:
        return None
    runs = np.concatenate([r for _, r in parts])
    owner = np.concatenate([np.full(len(r), c) for c, r in parts])
    order = np.argsort(runs[:, 0], kind="stable")
    runs, owner = runs[order], owner[order]
    # Each run against the furthest end reached by the runs before it.
    reach = np.maximum.accumulate(runs[:, 1])
    reach_owner = owner[_argmax_accumulate(runs[:, 1])]
    clash = np.flatnonzero(runs[1:, 0] < reach[:-1])
    for k in clash:
        # A clash with a run of the same class is a malformed RLE, not an overlap;
        # look back for another class's run still open at this start.
        start = runs[k + 1, 0]
        if reach_owner[k] != owner[k + 1]:
            return tuple(sorted((int(reach_owner[k]), int(owner[k + 1]))))  # type: ignore[return-value]
        open_before = np.flatnonzero((runs[: k + 1, 1] > start) & (owner[: k + 1] != owner[k + 1]))
        if open_before.size:
            return tuple(sorted((int(owner[open_before[0]]), int(owner[k + 1]))))  # type: ignore[return-value]
    return None


def _argmax_accumulate(values: np.ndarray) -> np.ndarray:
    """Index of the running maximum of ``values`` (first index on ties)."""
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    before = np.concatenate([[values[0] - 1], np.maximum.accumulate(values)[:-1]])
    rises = values > before  # where the running maximum grows: its new holder
    return np.maximum.accumulate(np.where(rises, np.arange(len(values)), 0))


def exclusive_levels(q: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """(C, H, W) class maps of one image (uint8 quantised or float probabilities, as the
    OOF store and predict hold them) -> the argmax masks in the same form: 255 (uint8) or
    1.0 (float) where a class wins, else 0; zero where the (H, W) ``void`` is set. Every
    threshold in (0, 1] then keeps exactly the argmax, so the per-class post-processing
    (minimum area, components, gate) runs on them unchanged."""
    q = np.asarray(q)
    probs = np.moveaxis(q, 0, -1).astype(np.float32)
    if q.dtype == np.uint8:
        probs /= 255.0
    masks = without_void(argmax_masks(probs), void)
    masks = np.moveaxis(masks, -1, 0)
    if q.dtype == np.uint8:
        return masks * np.uint8(255)
    return masks.astype(q.dtype)
