"""The predictor: built once from a plan and its networks, then fed images (pure run layer).

A ``Predictor`` holds a ``PredictionPlan`` (TTA views and merge, post-processing, the
submission's format and size) and the engines that run the networks: a
``SegmentationEngine`` (every fold's weights, one fold at a time) and, when a gate reads
it, a ``PresenceEngine`` (the separate classifier's folds). The engines are the only
framework-specific part: the Keras ones live in ``nn.engines``; an exported bundle's
run without TensorFlow. Everything here is numpy:

- ``predict_probs``: folds outer, batches inner (each fold's weights are selected once),
  every batch through the network with its TTA views (``core.tta.predict_views``), the
  folds merged on disk (``core.fold_merge.FoldAccumulator``); returns the presence head's
  mean over folds and views when the network has one;
- ``predict_presence``: the classifier folds' mean presence over folds and views;
- ``encode``: merged probs -> submission size -> uint8 (as the out-of-fold store the
  post-processing was tuned on) -> post-processing -> RLE rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import pandas as pd

from pipeline.core import rle
from pipeline.core.clock import StageClock
from pipeline.core.exclusive import exclusive_levels
from pipeline.core.fold_merge import FoldAccumulator
from pipeline.core.masks import resize_probs
from pipeline.core.postprocess import postprocess_image
from pipeline.core.prediction_plan import PredictionPlan
from pipeline.core.probstore import ProbWriter, quantise_prob
from pipeline.core.tta import orientation_groups, predict_views, stack_views, valid_views

log = logging.getLogger(__name__)


class SegmentationEngine(Protocol):
    """A segmentation network with its folds' weights.

    ``forward`` maps a batch (M, H, W, 3) float32 RGB in 0-255 to the mask probabilities
    (M, H, W, C) float32 and, for a network with a presence head, its (M, C) presence
    (else None). ``accepts(h, w)``: whether it runs (M, h, w, 3) batches (a fully
    convolutional network runs any size divisible by its stride).
    """

    @property
    def n_folds(self) -> int: ...

    def use_fold(self, fold: int) -> None: ...

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...

    def accepts(self, height: int, width: int) -> bool: ...


class PresenceEngine(Protocol):
    """A presence classifier with its folds' weights: (M, H, W, 3) float32 -> (M, C)."""

    @property
    def n_folds(self) -> int: ...

    def use_fold(self, fold: int) -> None: ...

    def forward(self, batch: np.ndarray) -> np.ndarray: ...

    def accepts(self, height: int, width: int) -> bool: ...


class ImageSet(Protocol):
    """Images resized to one size, with their ids and original sizes
    (``run.image_cache.ImageCache``)."""

    @property
    def image_ids(self) -> list[str]: ...

    @property
    def images(self) -> np.ndarray: ...

    @property
    def original_sizes(self) -> np.ndarray: ...


def iter_batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


class Predictor:
    """A plan and its networks, built once; feed it images (``predict_probs``, ``encode``)."""

    def __init__(
        self,
        plan: PredictionPlan,
        segmentation: SegmentationEngine,
        presence: PresenceEngine | None = None,
    ) -> None:
        if plan.uses_classifier and presence is None:
            raise ValueError(
                f"the post-processing gates {plan.gated_classes} with the classifier, but no "
                "classifier was given"
            )
        self.plan = plan
        self.segmentation = segmentation
        self.presence = presence

    def predict_probs(
        self, images: np.ndarray, accumulator: FoldAccumulator, clock: StageClock
    ) -> np.ndarray | None:
        """Every fold's TTA prediction of ``images`` (N, H, W, 3) uint8 at the plan's input
        size, merged into ``accumulator``; the presence head's (N, C) float32 mean over
        folds and views, or None without a head."""
        plan, engine = self.plan, self.segmentation
        height, width = int(images.shape[1]), int(images.shape[2])
        views = valid_views(plan.views, height, width, rotate=engine.accepts(width, height))
        presence: np.ndarray | None = None
        for fold in range(engine.n_folds):
            with clock.stage("load_weights"):
                engine.use_fold(fold)
            started = time.perf_counter()
            for start, stop in iter_batches(len(images), plan.batch_size):
                with clock.stage("network"):
                    batch = np.asarray(images[start:stop])
                    probs, head = _predict_tta(engine, batch, views, plan.merge)
                with clock.stage("accumulate"):
                    accumulator.add(start, probs)
                    if head is not None:
                        if presence is None:
                            presence = np.zeros((len(images), head.shape[1]), dtype=np.float64)
                        presence[start:stop] += head
            rate = len(images) / max(time.perf_counter() - started, 1e-9)
            log.info("fold %d: %d images predicted (%.2f images/s)", fold, len(images), rate)
        return None if presence is None else (presence / engine.n_folds).astype(np.float32)

    def predict_presence(self, images: np.ndarray, clock: StageClock) -> np.ndarray:
        """The separate classifier's (N, C) float32 presence of ``images`` (N, H, W, 3)
        uint8 at the plan's presence size (``predict_presence``)."""
        if self.presence is None:
            raise ValueError("this predictor has no presence classifier")
        return predict_presence(self.presence, images, self.plan.views, self.plan.batch_size, clock)

    def encode(
        self,
        image_ids: Sequence[str],
        original_sizes: np.ndarray,
        accumulator: FoldAccumulator,
        presence: np.ndarray | None,
        store: ProbWriter | None = None,
        on_masks: Callable[[int, np.ndarray], None] | None = None,
    ) -> pd.DataFrame:
        """Canonical table (image_id, class_name, rle) of the post-processed merged probs.

        Each image's merged prob is resized to the submission size (None: its original
        size), quantised like the out-of-fold store (``probstore.quantise_prob``) and
        post-processed per class; ``presence`` (N, C) is the gates' presence. The
        quantised probs also go to ``store`` when given (an ensemble blends them), and
        each image's post-processed masks (C, h, w) uint8 {0, 1} at the submission size to
        ``on_masks(i, masks)`` (folder mode writes them as PNG files).
        """
        plan = self.plan
        rows: list[tuple[str, str, str]] = []
        settings = [plan.postprocess[name] for name in plan.classes]
        for start, stop in iter_batches(len(image_ids), plan.batch_size):
            merged = accumulator.merged(start, stop)
            for offset, prob in enumerate(merged):
                i = start + offset
                height, width = original_sizes[i]
                target = plan.submission_size or (int(height), int(width))
                q = quantise_prob(resize_probs(prob, target))
                if store is not None:
                    store.add(image_ids[i], q)
                levels = q.transpose(2, 0, 1)
                if plan.exclusive:  # one class per pixel: the argmax, then per class
                    levels = exclusive_levels(levels)
                masks = postprocess_image(
                    levels,
                    settings,
                    None if presence is None else presence[i],
                    plan.at_least_one,
                )
                if on_masks is not None:
                    on_masks(i, masks)
                rows.extend(
                    (image_ids[i], name, text)
                    for name, text in zip(plan.classes, rle.encode_batch(masks), strict=True)
                )
        return pd.DataFrame(rows, columns=["image_id", "class_name", "rle"])


def predict_presence(
    engine: PresenceEngine,
    images: np.ndarray,
    views: Sequence[str],
    batch_size: int,
    clock: StageClock,
) -> np.ndarray:
    """A classifier's (N, C) float32 presence of ``images`` (N, H, W, 3) uint8: the mean
    over its folds and the TTA ``views`` (a view does not change which classes an image
    holds, so nothing is inverted; views that swap H and W run where the engine accepts
    the swapped size, else they are dropped)."""
    height, width = int(images.shape[1]), int(images.shape[2])
    views = valid_views(views, height, width, rotate=engine.accepts(width, height))
    total: np.ndarray | None = None
    for fold in range(engine.n_folds):
        with clock.stage("load_weights"):
            engine.use_fold(fold)
        with clock.stage("classifier"):
            for start, stop in iter_batches(len(images), batch_size):
                batch = np.asarray(images[start:stop])
                outputs = [
                    engine.forward(stack_views(batch, group).astype(np.float32))
                    for group in orientation_groups(views)
                ]
                stacked = np.concatenate(outputs).reshape(len(views), len(batch), -1)
                if total is None:
                    total = np.zeros((len(images), stacked.shape[-1]), dtype=np.float64)
                total[start:stop] += stacked.mean(axis=0)
    assert total is not None, "an engine has at least one fold and a set one image"
    return (total / engine.n_folds).astype(np.float32)


def _predict_tta(
    engine: SegmentationEngine, images: np.ndarray, views: Sequence[str], how: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """One batch's masks merged over ``views`` (``how``) and the presence head's mean."""
    n = len(images)
    presence: list[np.ndarray] = []

    def forward(stacked: np.ndarray) -> np.ndarray:
        masks, head = engine.forward(stacked.astype(np.float32))
        if head is not None:
            presence.append(head.reshape(-1, n, head.shape[-1]))
        return masks

    merged = predict_views(forward, images, views, how)
    if not presence:
        return merged, None
    return merged, np.concatenate(presence).mean(axis=0, dtype=np.float64).astype(np.float32)
