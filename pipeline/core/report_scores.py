"""The CV report's scores: out-of-fold masks scored per stage, fold and class (pure layer).

``ScoreAccumulator`` sums, per post-processing stage, fold and class, the Kaggle Dice of
every image, the pixel counts behind pixel-level Dice and IoU, and the image-level
presence confusion counts; ``score_table`` turns sums into metrics (per fold or pooled,
with an ``all`` row over classes) and ``summarise_folds`` gives the mean and standard
deviation across folds. Pixel-level means the intersections and areas summed over a
fold's images before dividing. ``WorstImages`` keeps the lowest-scoring images and
``presence_auc`` scores presence probabilities.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from pipeline.core.postprocess import PostprocessParams, postprocess_image

ALL_CLASSES = "all"
COUNT_COLUMNS: tuple[str, ...] = (
    "n_images",
    "dice_sum",
    "intersection",
    "truth_pixels",
    "pred_pixels",
    "tp",
    "fp",
    "fn",
    "tn",
)
METRIC_COLUMNS: tuple[str, ...] = (
    "kaggle_dice",
    "dice",
    "iou",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
)


def predict_masks(
    q: np.ndarray,
    params: Sequence[PostprocessParams],
    classifier_prob: np.ndarray | None,
    at_least_one: bool = False,
) -> np.ndarray:
    """Post-process every class of one image: ``q`` uint8 (C, H, W) -> uint8 (C, H, W) {0, 1}.

    ``params`` holds one setting per class; ``classifier_prob`` (C,) float64 is needed
    iff some class is gated by the classifier; ``at_least_one``: the rule of
    ``postprocess.postprocess_image``.
    """
    if q.dtype != np.uint8 or q.ndim != 3 or q.shape[0] != len(params):
        raise ValueError(f"q must be uint8 ({len(params)}, H, W); got {q.dtype} {q.shape}")
    return postprocess_image(q, params, classifier_prob, at_least_one)


class ScoreAccumulator:
    """Per (stage, fold, class) sums over images, in constant memory."""

    def __init__(self, classes: Sequence[str], n_folds: int, stages: Sequence[str]) -> None:
        self.classes = list(classes)
        self.stages = list(stages)
        if not self.classes or not self.stages or n_folds < 1:
            raise ValueError(
                f"need classes, stages and n_folds >= 1; got {self.classes}, {self.stages}, "
                f"{n_folds}"
            )
        self.n_folds = n_folds
        self._sums = np.zeros((len(self.stages), n_folds, len(self.classes), len(COUNT_COLUMNS)))

    def add(self, stage: str, fold: int, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Add one image: ``truth`` and ``pred`` (C, H, W) {0, 1}; returns its (C,) Kaggle Dice."""
        if stage not in self.stages:
            raise ValueError(f"stage must be one of {self.stages}; got {stage!r}")
        if not 0 <= fold < self.n_folds:
            raise ValueError(f"fold must be in [0, {self.n_folds - 1}]; got {fold}")
        if truth.shape != pred.shape or truth.ndim != 3 or truth.shape[0] != len(self.classes):
            raise ValueError(
                f"truth and pred must both be ({len(self.classes)}, H, W); "
                f"got {truth.shape} and {pred.shape}"
            )
        t, p = truth.astype(bool), pred.astype(bool)
        inter = np.count_nonzero(t & p, axis=(1, 2))
        t_area = np.count_nonzero(t, axis=(1, 2))
        p_area = np.count_nonzero(p, axis=(1, 2))
        denom = t_area + p_area
        dice = np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))
        t_on, p_on = t_area > 0, p_area > 0
        row = np.stack(
            [
                np.ones(len(self.classes)),
                dice,
                inter,
                t_area,
                p_area,
                t_on & p_on,
                ~t_on & p_on,
                t_on & ~p_on,
                ~t_on & ~p_on,
            ],
            axis=1,
        )
        self._sums[self.stages.index(stage), fold] += row
        return dice

    def counts(self) -> pd.DataFrame:
        """Long table: ``stage, fold, class`` and the ``COUNT_COLUMNS`` sums."""
        s, f, c = np.meshgrid(
            np.arange(len(self.stages)),
            np.arange(self.n_folds),
            np.arange(len(self.classes)),
            indexing="ij",
        )
        frame = pd.DataFrame(self._sums.reshape(-1, len(COUNT_COLUMNS)), columns=COUNT_COLUMNS)
        frame.insert(0, "class", np.array(self.classes, dtype=object)[c.ravel()])
        frame.insert(0, "fold", f.ravel())
        frame.insert(0, "stage", np.array(self.stages, dtype=object)[s.ravel()])
        return frame


def _ratio(numerator: pd.Series, denominator: pd.Series, empty: float) -> np.ndarray:
    # ``empty`` is the value where nothing was counted: 1 for overlaps (both masks
    # empty is a perfect match), NaN for rates (undefined, never a made-up 0 or 1).
    num = numerator.to_numpy(dtype=np.float64)
    den = denominator.to_numpy(dtype=np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)


def score_table(counts: pd.DataFrame, pooled: bool = False) -> pd.DataFrame:
    """Metrics from ``ScoreAccumulator.counts()`` sums, with an ``all`` row over classes.

    Per ``stage, fold, class`` (``pooled``: per ``stage, class``, folds summed):
    ``kaggle_dice`` (mean over images), pixel-level ``dice`` and ``iou`` (1 when truth
    and prediction are empty throughout), and the presence ``tp, fp, fn, tn`` with
    ``accuracy, sensitivity, specificity, precision, f1`` (NaN where undefined).
    """
    keys = ["stage"] if pooled else ["stage", "fold"]
    stage_order = {s: i for i, s in enumerate(dict.fromkeys(counts["stage"]))}
    class_order = {c: i for i, c in enumerate(dict.fromkeys(counts["class"]))}
    class_order[ALL_CLASSES] = len(class_order)
    columns = list(COUNT_COLUMNS)
    per_class = counts.groupby([*keys, "class"], sort=False)[columns].sum().reset_index()
    overall = counts.groupby(keys, sort=False)[columns].sum().reset_index()
    overall["class"] = ALL_CLASSES
    frame = pd.concat([per_class, overall], ignore_index=True)
    frame["_stage"] = frame["stage"].map(stage_order)
    frame["_class"] = frame["class"].map(class_order)
    order = ["_stage", "_class"] if pooled else ["_stage", "fold", "_class"]
    frame = frame.sort_values(order, kind="stable").drop(columns=["_stage", "_class"])
    frame = frame.reset_index(drop=True)
    inter, t, p = frame["intersection"], frame["truth_pixels"], frame["pred_pixels"]
    tp, fp, fn, tn = frame["tp"], frame["fp"], frame["fn"], frame["tn"]
    frame["kaggle_dice"] = _ratio(frame["dice_sum"], frame["n_images"], np.nan)
    frame["dice"] = _ratio(2 * inter, t + p, 1.0)
    frame["iou"] = _ratio(inter, t + p - inter, 1.0)
    frame["accuracy"] = _ratio(tp + tn, tp + fp + fn + tn, np.nan)
    frame["sensitivity"] = _ratio(tp, tp + fn, np.nan)
    frame["specificity"] = _ratio(tn, tn + fp, np.nan)
    frame["precision"] = _ratio(tp, tp + fp, np.nan)
    frame["f1"] = _ratio(2 * tp, 2 * tp + fp + fn, np.nan)
    for name in ("n_images", "intersection", "truth_pixels", "pred_pixels", "tp", "fp", "fn", "tn"):
        frame[name] = frame[name].astype(np.int64)
    return frame.drop(columns=["dice_sum"])


def summarise_folds(fold_scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation across folds of ``score_table`` per-fold metrics.

    One row per ``stage, class``; columns ``n_folds`` and ``<metric>_mean``,
    ``<metric>_std`` for each of ``METRIC_COLUMNS``. The std is the population one
    (ddof 0), as ``threshold_search`` reports it; NaN values (undefined rates) are skipped.
    """
    grouped = fold_scores.groupby(["stage", "class"], sort=False)
    out = grouped.size().rename("n_folds").reset_index()
    for name in METRIC_COLUMNS:
        values = grouped[name]
        out[f"{name}_mean"] = values.mean().to_numpy()
        out[f"{name}_std"] = values.std(ddof=0).to_numpy()
    return out


class WorstImages:
    """Keeps the ``k`` images of lowest score seen so far (ties: the earlier one stays)."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0; got {k}")
        self.k = k
        self._heap: list[tuple[float, int, str, Any]] = []
        self._counter = itertools.count()

    def add(self, score: float, image_id: str, payload: Any = None) -> None:
        """Offer one image; ``payload`` (e.g. its masks) is kept only if the image is kept."""
        if self.k == 0:
            return
        entry = (-score, -next(self._counter), image_id, payload)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif score < -self._heap[0][0]:
            heapq.heapreplace(self._heap, entry)

    def items(self) -> list[tuple[float, str, Any]]:
        """``(score, image_id, payload)``, lowest score first."""
        ordered = sorted(self._heap, key=lambda e: (-e[0], -e[1]))
        return [(-neg, image_id, payload) for neg, _, image_id, payload in ordered]


def presence_auc(truth: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """ROC AUC per class of (N, C) presence probs against (N, C) {0, 1} truth (NaN: one label)."""
    if truth.shape != probs.shape or truth.ndim != 2 or truth.shape[1] != len(classes):
        raise ValueError(
            f"truth and probs must both be (N, {len(classes)}); got {truth.shape}, {probs.shape}"
        )
    out = {}
    for c, name in enumerate(classes):
        labels = truth[:, c] > 0.5
        single = labels.all() or not labels.any()
        out[name] = float("nan") if single else float(roc_auc_score(labels, probs[:, c]))
    return out
