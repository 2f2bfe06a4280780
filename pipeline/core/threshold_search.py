"""Exact, streaming grid search of per-class post-processing on out-of-fold probs.

Per class it scores every pixel threshold t, minimum component size m, minimum mask
area a and gate (none, or a gate kind with threshold g) by the Kaggle Dice: the mean
over image-class pairs of ``2|A & B| / (|A| + |B|)``, 1 when both are empty. The rules
are exactly those of ``postprocess.postprocess_mask`` on uint8-quantised probs.

One pass, constant memory: for each image and class, one ``bincount`` of the 256 prob
levels (over all pixels and over truth pixels; ``level_counts``) gives, by reverse
cumulative sums, the predicted area and the intersection at every threshold level. From
these the Dice of every (t, a) is computed at once; a gate that fails turns the
prediction empty (Dice 1 if the truth is empty, else 0). Component sizes other than 0
need where the pixels are, not only their counts: each image is labelled once per class
and threshold (``level_counts.component_counts``), and the (threshold, size) pairs
form one axis of B = M * T binarisation settings. Per class and fold, the Dice is
summed into arrays of shape (n_folds, B, A) and (gate kinds, n_folds, B, A, G),
whatever the number of images. This module accumulates those sums;
``threshold_choice`` chooses the settings from them (ties, nested scores) and
``tune_result`` holds the outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from pipeline.core.level_counts import (
    _LEVELS,
    class_histograms,
    component_counts,
    dice_from_counts,
)
from pipeline.core.postprocess import (
    CLASSIFIER_GATES,
    GATES,
    TOPK_GATES,
    fused_score,
    quantise_threshold,
    topk_count,
)
from pipeline.core.probstore import QUANTISATION
from pipeline.core.threshold_choice import GATE_KINDS, PLAIN_THRESHOLD, GridSums
from pipeline.core.tune_result import TuneResult

logger = logging.getLogger(__name__)

_LEVELS_DESC = np.arange(QUANTISATION, -1, -1, dtype=np.int64)


def _check_grid(name: str, values: Sequence[float], integer: bool = False) -> np.ndarray:
    what = "integers >= 0" if integer else "numbers in [0, 1]"
    if isinstance(values, (str, bytes)) or any(
        isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
        for v in values
    ):
        raise ValueError(f"{name} must be a list of {what}; got {values!r}")
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be a list of {what}; got {list(values)}")
    if len(set(array.tolist())) != len(array):
        raise ValueError(f"{name} must not repeat values; got {list(values)}")
    if integer:
        if ((array < 0) | (array != np.round(array))).any():
            raise ValueError(f"{name} must be integers >= 0; got {list(values)}")
        return array.astype(np.int64)
    if ((array < 0) | (array > 1)).any():
        raise ValueError(f"{name} must lie in [0, 1]; got {list(values)}")
    return array


class GridAccumulator:
    """Streams (image, fold) pairs in and sums the Dice of every grid point per class.

    ``gates`` lists the candidates among ``postprocess.GATES`` (``none`` = no gate may
    be chosen); a ``classifier`` gate needs a ``classifier_prob`` with every image.
    ``min_components`` are the candidate minimum component sizes (``(0,)``: none
    removed, and the search needs only level counts). Memory is constant in the number
    of images, apart from the set of seen ids that catches duplicates.
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
        min_components: Sequence[int] = (0,),
    ) -> None:
        self.classes = list(classes)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be non-empty and unique; got {self.classes}")
        self.thresholds = _check_grid("thresholds", thresholds)
        self.min_areas = _check_grid("min_areas", min_areas, integer=True)
        self.gate_thresholds = _check_grid("gate_thresholds", gate_thresholds)
        self.min_components = _check_grid("min_components", min_components, integer=True)
        if not len(self.min_components):
            raise ValueError("min_components must hold at least one value (0: none removed)")
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
        self._threshold_levels = [quantise_threshold(t) for t in self.thresholds]
        # The binarisation axis: (min component, threshold) pairs, size-major.
        n_sizes = len(self.min_components)
        self._levels = np.tile(self._threshold_levels, n_sizes)
        self._setting_thresholds = np.tile(self.thresholds, n_sizes)
        self._setting_components = np.repeat(self.min_components, len(self.thresholds))
        self.labels_components = bool((self.min_components > 1).any())
        self._plain_level = quantise_threshold(PLAIN_THRESHOLD)
        c, t, a, g = (
            len(self.classes),
            len(self._levels),
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
        components = self.component_counts(q, truth)
        self.add_histograms(
            [image_id],
            [fold],
            hist[None],
            q.shape[1] * q.shape[2],
            prob,
            None if components is None else components[None],
        )

    def component_counts(self, q: np.ndarray, truth: np.ndarray) -> np.ndarray | None:
        """(C, B, 2) counts after component removal, or None when no size is searched.

        ``q`` (C, H, W) uint8 and ``truth`` (C, H, W) uint8 {0, 1}, as for ``add``; the
        ``components`` of ``add_histograms`` for one image.
        """
        if not self.labels_components:
            return None
        return component_counts(q, truth, self._threshold_levels, self.min_components.tolist())

    def add_histograms(
        self,
        image_ids: Sequence[str],
        folds: Sequence[int] | np.ndarray,
        hists: np.ndarray,
        n_pixels: int | Sequence[int] | np.ndarray,
        classifier_probs: np.ndarray | None = None,
        components: np.ndarray | None = None,
    ) -> None:
        """Score a batch of N images at every grid point from their level counts.

        ``hists`` (N, C, 2, 256) int: ``class_histograms`` of each image (all pixels
        not in the truth, then truth pixels); ``n_pixels`` each image's H * W (one int
        for all, or N); ``classifier_probs`` (N, C) in [0, 1], needed iff the
        classifier gate is searched; ``components`` (N, C, B, 2), each image's
        ``component_counts``, needed iff a component size above 1 is searched. The same
        sums as adding the images one by one, vectorised over the batch.
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

        if self.labels_components != (components is not None):
            raise ValueError(
                f"components of {image_ids[0]!r} must be given iff min_components "
                f"{self.min_components.tolist()} holds a size above 1"
            )
        if components is not None:
            components = np.asarray(components)
            if components.shape != (n, c, len(self._levels), 2):
                raise ValueError(
                    f"components must be ({n}, {c}, {len(self._levels)}, 2); got {components.shape}"
                )
            pred, inter = components[..., 0], components[..., 1]
        else:
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
        wants_classifier = bool(CLASSIFIER_GATES & set(self.kinds))
        if wants_classifier != (classifier_probs is not None):
            raise ValueError(
                f"classifier_prob of {image_ids[0]!r} must be given iff gates include "
                f"{' or '.join(sorted(CLASSIFIER_GATES))} (gates {list(self.gates)}); "
                f"got {classifier_probs!r}"
            )
        prob = np.zeros((n, c))
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
        topk = self._topk_means(hist_all, n_pixels) if TOPK_GATES & set(self.kinds) else prob
        for i, kind in enumerate(self.kinds):
            scores[i] = {"classifier": prob, "segmentation": topk}.get(kind)
            if kind == "fused":
                scores[i] = fused_score(prob, topk)
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
        """Choose each class's setting (``threshold_choice``) and report scores."""
        return self.sums().result()

    def sums(self) -> GridSums:
        """The Dice sums gathered so far, with the grid they were taken on."""
        n_images = int(self._counts.sum())
        if n_images == 0:
            raise ValueError("no image was added; cannot choose post-processing")
        empty_folds = np.flatnonzero(self._counts == 0).tolist()
        if empty_folds:
            logger.warning("folds %s have no image; their fold scores are NaN", empty_folds)
        return GridSums(
            classes=list(self.classes),
            thresholds=self._setting_thresholds,
            min_components=self._setting_components,
            min_areas=self.min_areas,
            gate_thresholds=self.gate_thresholds,
            gates=self.gates,
            kinds=list(self.kinds),
            topk_fraction=self.topk_fraction,
            base=self._base,
            gated=self._gated,
            plain=self._plain,
            counts=self._counts,
        )
