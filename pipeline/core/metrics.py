"""Segmentation and presence metrics: the formulas, once, in numpy.

The Keras metrics in ``pipeline.nn.losses`` are thin wrappers over these definitions and
are tested against them. Conventions shared by every function here:

- Batches are channels-last, ``(N, H, W, C)``, as Keras lays them out.
- A probability counts as foreground when it is at or above the threshold
  (``prob >= threshold``, ``above_threshold``): the one rule of the whole pipeline, for
  the Keras metrics, the OOF scores, the post-processing and its search alike. (The
  Clouds kernels use ``>``; the two differ only for a probability exactly on the
  threshold, which the uint8 prob stores make possible, so one rule must hold.)
- Truth masks are binarised as ``truth > 0.5`` so that uint8 {0, 1} and float masks
  are read the same way.
- ``min_area`` applies to the whole predicted mask of one image and class: a mask with
  fewer than ``min_area`` foreground pixels becomes empty.
- An empty prediction on an empty truth scores 1 (the Kaggle rule).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

SOFT_DICE_SMOOTH = 1.0


def _check_same_shape(truth: np.ndarray, other: np.ndarray, other_name: str) -> None:
    if truth.shape != other.shape:
        raise ValueError(
            f"truth and {other_name} must have the same shape; got {truth.shape} and {other.shape}"
        )


def _check_batch(truth: np.ndarray, prob: np.ndarray) -> None:
    if prob.ndim != 4:
        raise ValueError(f"prob must be a (N, H, W, C) batch; got shape {prob.shape}")
    _check_same_shape(truth, prob, "prob")


def _as_mask(truth: np.ndarray) -> np.ndarray:
    return np.asarray(truth) > 0.5


def above_threshold(prob: np.ndarray, threshold: float) -> np.ndarray:
    """The pipeline's one thresholding rule: bool mask of ``prob >= threshold``."""
    return np.asarray(prob) >= threshold


def _predict_masks(prob: np.ndarray, threshold: float, min_area: int) -> np.ndarray:
    """Threshold a (N, H, W, C) batch and empty the masks smaller than min_area."""
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0; got {min_area}")
    pred = above_threshold(prob, threshold)
    if min_area > 0:
        area = pred.sum(axis=(1, 2), keepdims=True)
        pred = pred & (area >= min_area)
    return pred


def _overlap_ratio(numerator: float, denominator: float) -> float:
    # Both masks empty: the prediction is exactly right.
    return 1.0 if denominator == 0 else float(numerator / denominator)


def dice(truth: np.ndarray, pred: np.ndarray, smooth: float = 0.0) -> float:
    """Dice coefficient of two binary masks of any equal shape, pooled over all pixels.

    ``(2 |A and B| + smooth) / (|A| + |B| + smooth)``; 1.0 when both masks are empty.
    ``truth`` and ``pred`` are {0, 1} or bool arrays (values > 0.5 count as foreground).
    """
    _check_same_shape(truth, pred, "pred")
    t, p = _as_mask(truth), _as_mask(pred)
    intersection = np.count_nonzero(t & p)
    total = np.count_nonzero(t) + np.count_nonzero(p)
    return _overlap_ratio(2.0 * intersection + smooth, total + smooth)


def iou(truth: np.ndarray, pred: np.ndarray, smooth: float = 0.0) -> float:
    """Intersection over union (Jaccard index) of two binary masks of equal shape.

    ``(|A and B| + smooth) / (|A or B| + smooth)``; 1.0 when both masks are empty.
    """
    _check_same_shape(truth, pred, "pred")
    t, p = _as_mask(truth), _as_mask(pred)
    intersection = np.count_nonzero(t & p)
    union = np.count_nonzero(t | p)
    return _overlap_ratio(intersection + smooth, union + smooth)


def soft_dice(truth: np.ndarray, prob: np.ndarray, smooth: float = SOFT_DICE_SMOOTH) -> float:
    """Soft Dice over everything given, flattened (the Clouds kernels' ``dice_coef``).

    ``(2 sum(t p) + smooth) / (sum(t) + sum(p) + smooth)`` with ``truth`` in {0, 1} and
    ``prob`` float in [0, 1], any equal shapes; computed in float64.
    """
    _check_same_shape(truth, prob, "prob")
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    return float((2.0 * np.sum(t * p) + smooth) / (np.sum(t) + np.sum(p) + smooth))


def kaggle_dice(
    truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5, min_area: int = 0
) -> np.ndarray:
    """Kaggle Dice of every image and class.

    ``truth`` (N, H, W, C) {0, 1}, ``prob`` (N, H, W, C) float in [0, 1]. The prediction
    is ``prob >= threshold`` with masks under ``min_area`` pixels emptied; each score is
    ``2 |A and B| / (|A| + |B|)``, 1.0 when both are empty. Returns (N, C) float64.
    """
    _check_batch(truth, prob)
    t = _as_mask(truth)
    p = _predict_masks(prob, threshold, min_area)
    intersection = np.count_nonzero(t & p, axis=(1, 2)).astype(np.float64)
    total = (np.count_nonzero(t, axis=(1, 2)) + np.count_nonzero(p, axis=(1, 2))).astype(np.float64)
    scores = np.ones_like(total)
    np.divide(2.0 * intersection, total, out=scores, where=total > 0)
    return scores


def kaggle_dice_mean(
    truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5, min_area: int = 0
) -> float:
    """Mean of ``kaggle_dice`` over all images and classes (the leaderboard score)."""
    return float(kaggle_dice(truth, prob, threshold, min_area).mean())


def presence_accuracy(
    truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5, min_area: int = 0
) -> float:
    """Kaggle accuracy: share of image-class pairs whose presence is predicted right.

    ``truth`` (N, H, W, C) {0, 1}, ``prob`` (N, H, W, C) float. A class is present in
    the truth when its mask is non-empty, and predicted present when its mask is
    non-empty after ``prob >= threshold`` and the ``min_area`` rule.
    """
    _check_batch(truth, prob)
    truth_present = _as_mask(truth).any(axis=(1, 2))
    pred_present = _predict_masks(prob, threshold, min_area).any(axis=(1, 2))
    return float(np.mean(truth_present == pred_present))


def _safe_ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def presence_confusion(truth_present: np.ndarray, pred_present: np.ndarray) -> dict[str, float]:
    """Confusion counts and rates of presence predictions, pooled over all entries.

    ``truth_present`` and ``pred_present`` are bool arrays of equal shape (e.g. (N, C)
    or (N,) for one class). Returns ``tp, fp, fn, tn`` (int) and ``accuracy,
    sensitivity, specificity, precision, f1`` (float); a rate whose denominator is 0
    is nan (undefined), never a made-up 0 or 1.
    """
    _check_same_shape(truth_present, pred_present, "pred_present")
    t = np.asarray(truth_present, dtype=bool)
    p = np.asarray(pred_present, dtype=bool)
    tp = int(np.count_nonzero(t & p))
    fp = int(np.count_nonzero(~t & p))
    fn = int(np.count_nonzero(t & ~p))
    tn = int(np.count_nonzero(~t & ~p))
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "accuracy": _safe_ratio(tp + tn, tp + fp + fn + tn),
        "sensitivity": _safe_ratio(tp, tp + fn),
        "specificity": _safe_ratio(tn, tn + fp),
        "precision": _safe_ratio(tp, tp + fp),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn),
    }


def topk_mean_score(
    prob: np.ndarray, k: int | None = None, fraction: float | None = None
) -> np.ndarray:
    """Mean of the top-k pixel probabilities of each image and class.

    A segmentation-derived presence score. ``prob`` is (H, W, C) or (N, H, W, C) float;
    give exactly one of ``k`` (pixels, 1..H*W) or ``fraction`` (of H*W, in (0, 1],
    rounded up to at least one pixel). Returns (C,) or (N, C) float64.
    """
    prob = np.asarray(prob)
    if prob.ndim not in (3, 4):
        raise ValueError(f"prob must be (H, W, C) or (N, H, W, C); got shape {prob.shape}")
    if (k is None) == (fraction is None):
        raise ValueError(f"give exactly one of k and fraction; got k={k}, fraction={fraction}")
    batch = prob[np.newaxis] if prob.ndim == 3 else prob
    n, h, w, c = batch.shape
    pixels = h * w
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
        # Rounding first keeps e.g. 0.01 * 100 = 1.0000000000000002 at one pixel.
        k = max(1, int(np.ceil(round(fraction * pixels, 6))))
    assert k is not None
    if not 1 <= k <= pixels:
        raise ValueError(f"k must be in [1, {pixels}] (H*W); got {k}")
    flat = batch.reshape(n, pixels, c)
    top = np.partition(flat, pixels - k, axis=1)[:, pixels - k :, :]
    scores = top.astype(np.float64).mean(axis=1)
    return scores[0] if prob.ndim == 3 else scores


PRESENCE_THRESHOLD = 0.5  # the operating point reported in metrics.json; the gate is tuned later


def score_presence(truth: np.ndarray, prob: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Presence scores of (N, C) probabilities against (N, C) {0, 1} truth.

    Per-class ROC AUC (nan where a class has one label only) and their nan-mean; pooled
    and per-class accuracy, sensitivity and specificity at probability 0.5.
    """
    from sklearn.metrics import roc_auc_score  # only here: most users of this module need none

    if truth.shape != prob.shape or truth.ndim != 2 or truth.shape[1] != len(classes):
        raise ValueError(
            f"truth and prob must both be (N, {len(classes)}); got {truth.shape} and {prob.shape}"
        )
    present = truth.astype(bool)
    predicted = prob >= PRESENCE_THRESHOLD
    auc = {
        name: float(roc_auc_score(present[:, c], prob[:, c]))
        if 0 < present[:, c].sum() < len(present)
        else float("nan")
        for c, name in enumerate(classes)
    }
    pooled = presence_confusion(present, predicted)
    per_class = {}
    for c, name in enumerate(classes):
        counts = presence_confusion(present[:, c], predicted[:, c])
        per_class[name] = {k: counts[k] for k in ("accuracy", "sensitivity", "specificity")}
    finite = [v for v in auc.values() if np.isfinite(v)]
    return {
        "oof_auc": float(np.mean(finite)) if finite else float("nan"),
        "oof_auc_per_class": auc,
        "oof_accuracy_050": pooled["accuracy"],
        "oof_sensitivity_050": pooled["sensitivity"],
        "oof_specificity_050": pooled["specificity"],
        "oof_per_class_050": per_class,
    }
