"""Exact, streaming grid search of per-class post-processing on out-of-fold probs.

Per class it scores every pixel threshold t, minimum mask area a and gate (none, or a
gate kind with threshold g) by the Kaggle Dice: the mean over image-class pairs of
``2|A & B| / (|A| + |B|)``, 1 when both are empty. The rules are exactly those of
``postprocess.postprocess_mask`` on uint8-quantised probs (no component removal: the
search leaves ``min_component`` at 0).

One pass, constant memory: for each image and class, one ``bincount`` of the 256 prob
levels (over all pixels and over truth pixels) gives, by reverse cumulative sums, the
predicted area and the intersection at every threshold level. From these the Dice of
every (t, a) is computed at once; a gate that fails turns the prediction empty (Dice 1
if the truth is empty, else 0). Per class and fold, the Dice is summed into arrays of
shape (n_folds, T, A) and (gate kinds, n_folds, T, A, G), whatever the number of images.

Ties (scores within ``TIE_TOLERANCE``) go to the simpler setting, in this order: no
gate, then the smaller min area, then the threshold closest to 0.5 (then the lower
one), then the gate kind in ``GATE_KINDS`` order, then the lower gate threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pipeline.core.postprocess import GATES, PostprocessParams, quantise_threshold, topk_count
from pipeline.core.probstore import QUANTISATION

logger = logging.getLogger(__name__)

GATE_KINDS: tuple[str, ...] = ("classifier", "segmentation")
PLAIN_THRESHOLD = 0.5
TIE_TOLERANCE = 1e-12
_LEVELS = QUANTISATION + 1
_LEVELS_DESC = np.arange(QUANTISATION, -1, -1, dtype=np.int64)
# cv2.calcHist counts in float32, exact below 2**24; np.bincount beyond that.
_CALCHIST_MAX_VALUES = 2**24


def _check_grid(name: str, values: Sequence[float], integer: bool = False) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if len(set(array.tolist())) != len(array):
        raise ValueError(f"{name} must not repeat values; got {list(values)}")
    if integer:
        if ((array < 0) | (array != np.round(array))).any():
            raise ValueError(f"{name} must be integers >= 0; got {list(values)}")
        return array.astype(np.int64)
    if ((array < 0) | (array > 1)).any():
        raise ValueError(f"{name} must lie in [0, 1]; got {list(values)}")
    return array


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


@dataclass(frozen=True)
class ClassResult:
    """One class's tuning outcome; scores are mean Kaggle Dice over its images."""

    name: str
    params: PostprocessParams  # the chosen setting (gates allowed)
    score: float
    no_gate_params: PostprocessParams  # the best threshold and area without a gate
    no_gate_score: float
    plain_score: float  # threshold 0.5, no min area, no gate
    fold_scores: tuple[float, ...]  # the chosen setting per fold; NaN for a fold with no image
    # Nested (honest) figures: for each fold, the setting chosen on the *other* folds and
    # its score on this one. ``nested_score`` pools them over all images like ``score``.
    nested_score: float = float("nan")
    nested_fold_scores: tuple[float, ...] = ()
    nested_params: tuple[PostprocessParams | None, ...] = ()  # None: fold has no image

    @property
    def stable(self) -> bool:
        """Whether every fold's nested choice is the setting chosen on all folds."""
        return all(p is None or p == self.params for p in self.nested_params)


@dataclass(frozen=True, eq=False)
class TuneResult:
    """Outcome of a grid search: the chosen settings, scores and the full score tables.

    ``no_gate_table`` is (C, T, A) mean Dice; ``gate_tables[kind]`` is (C, T, A, G + 1)
    with ``[..., 0]`` the no-gate column and ``[..., 1 + j]`` gate threshold j.
    Overall scores are means over classes (= over image-class pairs: every image has
    every class). Fold mean and std (ddof 0) are over folds that have images.
    """

    classes: list[str]
    thresholds: tuple[float, ...]
    min_areas: tuple[int, ...]
    gate_thresholds: tuple[float, ...]
    gates: tuple[str, ...]
    topk_fraction: float
    fold_counts: tuple[int, ...]
    per_class: dict[str, ClassResult]
    no_gate_table: np.ndarray = field(repr=False)
    gate_tables: dict[str, np.ndarray] = field(repr=False)

    def params_by_class(self) -> dict[str, PostprocessParams]:
        """The chosen setting of every class, in class order."""
        return {name: self.per_class[name].params for name in self.classes}

    def _mean(self, attribute: str) -> float:
        return float(np.mean([getattr(self.per_class[c], attribute) for c in self.classes]))

    @property
    def score(self) -> float:
        """Overall tuned score (gates allowed)."""
        return self._mean("score")

    @property
    def nested_score(self) -> float:
        """Overall nested score: each fold scored with settings tuned on the other folds."""
        return self._mean("nested_score")

    @property
    def nested_fold_scores(self) -> tuple[float, ...]:
        """Overall nested score per fold (NaN for a fold with no image)."""
        per_class = np.array([self.per_class[c].nested_fold_scores for c in self.classes])
        return tuple(float(s) for s in per_class.mean(axis=0))

    def stability(self) -> dict[str, dict[str, Any]]:
        """Per class: whether the folds' nested choices agree with the final one, and
        each fold's choice (threshold, min area, gate)."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.classes:
            r = self.per_class[name]
            chosen = [p.to_dict() if p is not None else None for p in r.nested_params]
            same = sum(1 for p in r.nested_params if p is not None and p == r.params)
            out[name] = {
                "stable": r.stable,
                "folds_agreeing": same,
                "folds": sum(1 for p in r.nested_params if p is not None),
                "per_fold": chosen,
            }
        return out

    @property
    def no_gate_score(self) -> float:
        """Overall score of tuned thresholds and areas without gates."""
        return self._mean("no_gate_score")

    @property
    def plain_score(self) -> float:
        """Overall score at threshold 0.5, no min area, no gate."""
        return self._mean("plain_score")

    @property
    def fold_scores(self) -> tuple[float, ...]:
        """Overall score of the chosen settings per fold (NaN for a fold with no image)."""
        per_class = np.array([self.per_class[c].fold_scores for c in self.classes])
        return tuple(float(s) for s in per_class.mean(axis=0))

    @property
    def fold_mean(self) -> float:
        """Mean over folds with images of ``fold_scores``."""
        return float(np.nanmean(self.fold_scores))

    @property
    def fold_std(self) -> float:
        """Standard deviation (ddof 0) over folds with images of ``fold_scores``."""
        return float(np.nanstd(self.fold_scores))

    def summary(self) -> pd.DataFrame:
        """One row per class plus ``overall``: scores, fold spread and the chosen setting."""
        rows = []
        for name in self.classes:
            result = self.per_class[name]
            folds = np.array(result.fold_scores)
            rows.append(
                {
                    "class": name,
                    "plain": result.plain_score,
                    "no_gate": result.no_gate_score,
                    "tuned": result.score,
                    "tuned_nested": result.nested_score,
                    "fold_mean": float(np.nanmean(folds)),
                    "fold_std": float(np.nanstd(folds)),
                    **result.params.to_dict(),
                }
            )
        rows.append(
            {
                "class": "overall",
                "plain": self.plain_score,
                "no_gate": self.no_gate_score,
                "tuned": self.score,
                "tuned_nested": self.nested_score,
                "fold_mean": self.fold_mean,
                "fold_std": self.fold_std,
            }
        )
        return pd.DataFrame(rows)

    def table_frame(self) -> pd.DataFrame:
        """Every grid point's mean Dice, long form: class, gate, gate_threshold,
        threshold, min_area, score (gate ``none`` rows have gate_threshold NaN)."""
        t_idx, a_idx = np.meshgrid(
            np.arange(len(self.thresholds)), np.arange(len(self.min_areas)), indexing="ij"
        )
        thresholds, areas = np.array(self.thresholds), np.array(self.min_areas)
        frames = []
        for c, name in enumerate(self.classes):
            frames.append(
                pd.DataFrame(
                    {
                        "class": name,
                        "gate": "none",
                        "gate_threshold": np.nan,
                        "threshold": thresholds[t_idx.ravel()],
                        "min_area": areas[a_idx.ravel()],
                        "score": self.no_gate_table[c].ravel(),
                    }
                )
            )
            for kind, table in self.gate_tables.items():
                for j, g in enumerate(self.gate_thresholds):
                    frames.append(
                        pd.DataFrame(
                            {
                                "class": name,
                                "gate": kind,
                                "gate_threshold": g,
                                "threshold": thresholds[t_idx.ravel()],
                                "min_area": areas[a_idx.ravel()],
                                "score": table[c, :, :, 1 + j].ravel(),
                            }
                        )
                    )
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready scores and grids (for ``postprocess.json``'s ``extra``)."""
        return {
            "scores": {
                "plain": self.plain_score,
                "no_gate": self.no_gate_score,
                # In-sample: chosen and scored on the same OOF images (optimistic).
                "tuned": self.score,
                # Honest: each fold scored with the setting chosen on the other folds.
                "tuned_nested": self.nested_score,
                "nested_fold_scores": list(self.nested_fold_scores),
                "fold_scores": list(self.fold_scores),
                "fold_mean": self.fold_mean,
                "fold_std": self.fold_std,
            },
            "per_class": {
                name: {
                    "plain": r.plain_score,
                    "no_gate": r.no_gate_score,
                    "no_gate_params": r.no_gate_params.to_dict(),
                    "tuned": r.score,
                    "tuned_nested": r.nested_score,
                    "fold_scores": list(r.fold_scores),
                    "nested_fold_scores": list(r.nested_fold_scores),
                }
                for name, r in self.per_class.items()
            },
            "stability": self.stability(),
            "grid": {
                "thresholds": list(self.thresholds),
                "min_areas": list(self.min_areas),
                "gate_thresholds": list(self.gate_thresholds),
                "gates": list(self.gates),
                "topk_fraction": self.topk_fraction,
            },
            "fold_counts": list(self.fold_counts),
        }


class GridAccumulator:
    """Streams (image, fold) pairs in and sums the Dice of every grid point per class.

    ``gates`` lists the candidates among ``postprocess.GATES`` (``none`` = no gate may
    be chosen); a ``classifier`` gate needs a ``classifier_prob`` with every image.
    Memory is constant in the number of images, apart from the set of seen ids that
    catches duplicates.
    """

    def __init__(
        self,
        classes: Sequence[str],
        thresholds: Sequence[float],
        min_areas: Sequence[int],
        gate_thresholds: Sequence[float],
        n_folds: int,
        topk_fraction: float,
        gates: Sequence[str] = GATES,
    ) -> None:
        self.classes = list(classes)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be non-empty and unique; got {self.classes}")
        self.thresholds = _check_grid("thresholds", thresholds)
        self.min_areas = _check_grid("min_areas", min_areas, integer=True)
        self.gate_thresholds = _check_grid("gate_thresholds", gate_thresholds)
        unknown = [g for g in gates if g not in GATES]
        if not gates or unknown or len(set(gates)) != len(gates):
            raise ValueError(f"gates must be distinct values from {list(GATES)}; got {list(gates)}")
        self.gates = tuple(gates)
        self.kinds = [kind for kind in GATE_KINDS if kind in self.gates]
        if not len(self.thresholds) or not len(self.min_areas):
            raise ValueError("thresholds and min_areas must each hold at least one value")
        if self.kinds and not len(self.gate_thresholds):
            raise ValueError(f"gate_thresholds must hold a value for gates {self.kinds}; got []")
        if n_folds < 1:
            raise ValueError(f"n_folds must be >= 1; got {n_folds}")
        self.n_folds = n_folds
        topk_count(1, topk_fraction)
        self.topk_fraction = topk_fraction
        self._levels = np.array([quantise_threshold(t) for t in self.thresholds])
        self._plain_level = quantise_threshold(PLAIN_THRESHOLD)
        c, t, a, g = (
            len(self.classes),
            len(self.thresholds),
            len(self.min_areas),
            len(self.gate_thresholds),
        )
        self._base = np.zeros((c, n_folds, t, a))
        self._gated = np.zeros((len(self.kinds), c, n_folds, t, a, g))
        self._plain = np.zeros((c, n_folds))
        self._counts = np.zeros(n_folds, dtype=np.int64)
        self._seen: set[str] = set()

    def add(
        self,
        image_id: str,
        fold: int,
        q: np.ndarray,
        truth: np.ndarray,
        classifier_prob: np.ndarray | None = None,
    ) -> None:
        """Score one image at every grid point.

        ``q`` (C, H, W) uint8 quantised probs; ``truth`` (C, H, W) uint8 {0, 1} or bool;
        ``classifier_prob`` (C,) float in [0, 1], needed iff the classifier gate is searched.
        """
        c = len(self.classes)
        if image_id in self._seen:
            raise ValueError(f"image_id {image_id!r} was already added")
        if not 0 <= fold < self.n_folds:
            raise ValueError(f"fold of {image_id!r} must be in [0, {self.n_folds - 1}]; got {fold}")
        if q.dtype != np.uint8 or q.ndim != 3 or q.shape[0] != c:
            raise ValueError(
                f"q of {image_id!r} must be uint8 ({c}, H, W); got {q.dtype} {q.shape}"
            )
        if truth.shape != q.shape:
            raise ValueError(f"truth of {image_id!r} must have shape {q.shape}; got {truth.shape}")
        if truth.dtype == np.bool_:
            truth = truth.view(np.uint8)
        elif truth.dtype != np.uint8 or (truth.size and truth.max() > 1):
            raise ValueError(f"truth of {image_id!r} must be uint8 in {{0, 1}} or bool")

        hist = class_histograms(q, truth)
        prob = None if classifier_prob is None else np.asarray(classifier_prob)[None]
        self.add_histograms([image_id], [fold], hist[None], q.shape[1] * q.shape[2], prob)

    def add_histograms(
        self,
        image_ids: Sequence[str],
        folds: Sequence[int] | np.ndarray,
        hists: np.ndarray,
        n_pixels: int | Sequence[int] | np.ndarray,
        classifier_probs: np.ndarray | None = None,
    ) -> None:
        """Score a batch of N images at every grid point from their level counts.

        ``hists`` (N, C, 2, 256) int: ``class_histograms`` of each image (all pixels
        not in the truth, then truth pixels); ``n_pixels`` each image's H * W (one int
        for all, or N); ``classifier_probs`` (N, C) in [0, 1], needed iff the
        classifier gate is searched. The same sums as adding the images one by one,
        vectorised over the batch.
        """
        c = len(self.classes)
        n = len(image_ids)
        folds = np.asarray(folds, dtype=np.int64).reshape(-1)
        hists = np.asarray(hists)
        if hists.shape != (n, c, 2, _LEVELS) or folds.shape != (n,):
            raise ValueError(
                f"hists must be ({n}, {c}, 2, {_LEVELS}) and folds ({n},) for {n} image ids; "
                f"got {hists.shape} and {folds.shape}"
            )
        bad = np.flatnonzero((folds < 0) | (folds >= self.n_folds))
        if bad.size:
            raise ValueError(
                f"fold of {image_ids[bad[0]]!r} must be in [0, {self.n_folds - 1}]; "
                f"got {folds[bad[0]]}"
            )
        repeated = [i for i in image_ids if i in self._seen]
        if repeated or len(set(image_ids)) != n:
            first = (
                repeated[0] if repeated else next(i for i in image_ids if image_ids.count(i) > 1)
            )
            raise ValueError(f"image_id {first!r} was already added")
        pixels = np.broadcast_to(np.asarray(n_pixels, dtype=np.int64), (n,))
        hist_all = hists[:, :, 0] + hists[:, :, 1]
        scores = self._gate_scores(image_ids, hist_all, pixels, classifier_probs)
        # above[..., l] = number of pixels with level >= l, for l in 0..256.
        above_all = np.zeros((n, c, _LEVELS + 1), dtype=np.int64)
        above_pos = np.zeros((n, c, _LEVELS + 1), dtype=np.int64)
        above_all[..., :-1] = np.cumsum(hist_all[..., ::-1], axis=-1)[..., ::-1]
        above_pos[..., :-1] = np.cumsum(hists[:, :, 1, ::-1], axis=-1)[..., ::-1]
        truth_area = above_pos[..., :1]

        pred = above_all[..., self._levels]
        inter = above_pos[..., self._levels]
        keep = pred[..., None] >= self.min_areas
        base = dice_from_counts(  # (N, C, T, A)
            np.where(keep, pred[..., None], 0),
            np.where(keep, inter[..., None], 0),
            truth_area[..., None],
        )
        plain = dice_from_counts(  # (N, C)
            above_all[..., self._plain_level], above_pos[..., self._plain_level], truth_area[..., 0]
        )
        empty = (truth_area[..., 0] == 0).astype(np.float64)  # (N, C)
        for fold in np.unique(folds).tolist():
            rows = folds == fold
            fold_base = base[rows]
            self._base[:, fold] += fold_base.sum(axis=0)
            self._plain[:, fold] += plain[rows].sum(axis=0)
            self._counts[fold] += int(rows.sum())
            if self.kinds:
                # A gate that passes keeps the Dice, one that fails scores the empty
                # prediction: sum_n pass * base + sum_n (1 - pass) * empty.
                passes = (scores[:, rows, :, None] >= self.gate_thresholds).astype(np.float64)
                kept = np.einsum("kncg,ncta->kctag", passes, fold_base)
                failed = np.einsum("kncg,nc->kcg", 1.0 - passes, empty[rows])
                self._gated[:, :, fold] += kept + failed[:, :, None, None, :]
        self._seen.update(image_ids)

    def _gate_scores(
        self,
        image_ids: Sequence[str],
        hist_all: np.ndarray,
        n_pixels: np.ndarray,
        classifier_probs: np.ndarray | None,
    ) -> np.ndarray:
        """(kinds, N, C) float64 gate scores of N images, from their (N, C, 256) counts."""
        n, c = hist_all.shape[:2]
        scores = np.zeros((len(self.kinds), n, c))
        wants_classifier = "classifier" in self.kinds
        if wants_classifier != (classifier_probs is not None):
            raise ValueError(
                f"classifier_prob of {image_ids[0]!r} must be given iff gates include "
                f"'classifier' (gates {list(self.gates)}); got {classifier_probs!r}"
            )
        if classifier_probs is not None:
            prob = np.asarray(classifier_probs, dtype=np.float64)
            if prob.shape != (n, c):
                raise ValueError(
                    f"classifier_prob of {image_ids[0]!r} must be ({c},) in [0, 1] per image; "
                    f"got shape {prob.shape[1:]}"
                )
            bad = np.flatnonzero(~((prob >= 0) & (prob <= 1)).all(axis=1))
            if bad.size:
                raise ValueError(
                    f"classifier_prob of {image_ids[bad[0]]!r} must be ({c},) in [0, 1]; "
                    f"got {prob[bad[0]]!r}"
                )
            scores[self.kinds.index("classifier")] = prob
        if "segmentation" in self.kinds:
            scores[self.kinds.index("segmentation")] = self._topk_means(hist_all, n_pixels)
        return scores

    def _topk_means(self, hist_all: np.ndarray, n_pixels: np.ndarray) -> np.ndarray:
        """(N, C) ``postprocess.segmentation_score`` of each class map, from (N, C, 256) counts.

        Same exact integer sum of the k largest levels, divided the same way.
        """
        k = np.array([topk_count(int(p), self.topk_fraction) for p in n_pixels])[:, None]
        desc = hist_all[..., ::-1]
        before = np.cumsum(desc, axis=-1) - desc
        take = np.clip(k[..., None] - before, 0, desc)
        total = (take * _LEVELS_DESC).sum(axis=-1)
        return total / (k * float(QUANTISATION))

    def result(self) -> TuneResult:
        """Choose each class's setting (ties as in the module docstring) and report scores."""
        n_images = int(self._counts.sum())
        if n_images == 0:
            raise ValueError("no image was added; cannot choose post-processing")
        empty_folds = np.flatnonzero(self._counts == 0).tolist()
        if empty_folds:
            logger.warning("folds %s have no image; their fold scores are NaN", empty_folds)
        base_mean = self._base.sum(axis=1) / n_images
        gated_mean = self._gated.sum(axis=2) / n_images
        plain_mean = self._plain.sum(axis=1) / n_images

        per_class: dict[str, ClassResult] = {}
        for c, name in enumerate(self.classes):
            no_gate = self._best(base_mean[c], gated_mean[:, c], True, False)
            best = self._best(
                base_mean[c], gated_mean[:, c], "none" in self.gates, bool(self.kinds)
            )
            fold_sums = self._sums_of(c, best)
            with np.errstate(invalid="ignore"):
                fold_scores = fold_sums / self._counts
            nested_sums, nested_choices = self._nested(c)
            with np.errstate(invalid="ignore"):
                nested_fold_scores = nested_sums / self._counts
            per_class[name] = ClassResult(
                name=name,
                params=self._params(best),
                score=float(fold_sums.sum() / n_images),
                no_gate_params=self._params(no_gate),
                no_gate_score=float(self._sums_of(c, no_gate).sum() / n_images),
                plain_score=float(plain_mean[c]),
                fold_scores=tuple(float(s) for s in fold_scores),
                nested_score=float(np.nansum(nested_sums) / n_images),
                nested_fold_scores=tuple(float(s) for s in nested_fold_scores),
                nested_params=tuple(
                    None if choice is None else self._params(choice) for choice in nested_choices
                ),
            )
        gate_tables = {
            kind: np.concatenate([base_mean[..., None], gated_mean[i]], axis=-1)
            for i, kind in enumerate(self.kinds)
        }
        return TuneResult(
            classes=list(self.classes),
            thresholds=tuple(float(t) for t in self.thresholds),
            min_areas=tuple(int(a) for a in self.min_areas),
            gate_thresholds=tuple(float(g) for g in self.gate_thresholds),
            gates=self.gates,
            topk_fraction=self.topk_fraction,
            fold_counts=tuple(int(count) for count in self._counts),
            per_class=per_class,
            no_gate_table=base_mean,
            gate_tables=gate_tables,
        )

    def _nested(self, c: int) -> tuple[np.ndarray, list[tuple[str | None, int, int, int] | None]]:
        """Class ``c``'s nested Dice sums per fold and each fold's choice.

        Fold f is scored at the setting that the same rule (``_best``) chooses on the
        sums of every other fold; a fold with no image scores 0 and has no choice. With
        a single fold holding images there is nothing else to tune on, so that fold
        falls back to its own (in-sample) choice, which only happens on degenerate splits.
        """
        allow_none, allow_gates = "none" in self.gates, bool(self.kinds)
        total_base = self._base[c].sum(axis=0)
        total_gated = self._gated[:, c].sum(axis=1)
        sums = np.zeros(self.n_folds)
        choices: list[tuple[str | None, int, int, int] | None] = []
        for fold in range(self.n_folds):
            count = int(self._counts[fold])
            if count == 0:
                choices.append(None)
                continue
            others = int(self._counts.sum()) - count
            if others == 0:
                base, gated, n = total_base, total_gated, count
            else:
                base = total_base - self._base[c, fold]
                gated = total_gated - self._gated[:, c, fold]
                n = others
            choice = self._best(base / n, gated / n, allow_none, allow_gates)
            sums[fold] = self._sums_of(c, choice)[fold]
            choices.append(choice)
        return sums, choices

    def _sums_of(self, c: int, choice: tuple[str | None, int, int, int]) -> np.ndarray:
        """(n_folds,) Dice sums of class ``c`` at one grid point."""
        kind, t, a, g = choice
        if kind is None:
            return self._base[c, :, t, a]
        return self._gated[self.kinds.index(kind), c, :, t, a, g]

    def _best(
        self, base: np.ndarray, gated: np.ndarray, allow_none: bool, allow_gates: bool
    ) -> tuple[str | None, int, int, int]:
        """(gate kind or None, t index, a index, g index) of the best candidate.

        ``base`` is (T, A) and ``gated`` (kinds, T, A, G) mean Dice of one class.
        """
        # Gate options: none, then every (kind, gate threshold), kind-major.
        options = [(None, 0)] + [
            (kind, j) for kind in self.kinds for j in range(len(self.gate_thresholds))
        ]
        scores = np.concatenate([base[None], np.moveaxis(gated, -1, 1).reshape(-1, *base.shape)])
        allowed = np.array([allow_none] + [allow_gates] * (len(options) - 1))
        scores = np.where(allowed[:, None, None], scores, -np.inf)
        tied = np.flatnonzero(scores.ravel() >= scores.max() - TIE_TOLERANCE)
        o, t, a = np.unravel_index(tied, scores.shape)
        is_gated = o > 0
        kind_rank = np.array([-1] + [GATE_KINDS.index(k) for k, _ in options[1:]])[o]
        gate_value = np.array([-1.0] + [self.gate_thresholds[j] for _, j in options[1:]])[o]
        thresholds = self.thresholds[t]
        # lexsort's last key is the primary one: simplest setting first.
        first = np.lexsort(
            (
                gate_value,
                kind_rank,
                thresholds,
                np.abs(thresholds - PLAIN_THRESHOLD),
                self.min_areas[a],
                is_gated,
            )
        )[0]
        kind, j = options[o[first]]
        return kind, int(t[first]), int(a[first]), j

    def _params(self, choice: tuple[str | None, int, int, int]) -> PostprocessParams:
        kind, t, a, g = choice
        return PostprocessParams(
            threshold=float(self.thresholds[t]),
            min_area=int(self.min_areas[a]),
            gate=kind or "none",
            gate_threshold=None if kind is None else float(self.gate_thresholds[g]),
            topk_fraction=self.topk_fraction if kind == "segmentation" else None,
        )
