"""The network side of prediction (Keras layer): the folds' TTA predictions merged on
disk, the classifier's presence probabilities and the post-processed, RLE-encoded table.

- ``build_prediction_model``: the segmentation model that every fold's weights go into;
- ``predict_folds``: every fold x batch through ``inference.predict_tta`` into a
  ``FoldAccumulator``;
- ``predict_presence``: the classifier folds' mean presence probability per class;
- ``encode_predictions``: merged probs -> submission size -> uint8 -> post-processing
  -> RLE rows.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import rle
from pipeline.core.clock import StageClock
from pipeline.core.config import Config
from pipeline.core.fold_merge import FoldAccumulator
from pipeline.core.layout import CLASSIFIER_STAGE
from pipeline.core.masks import resize_probs
from pipeline.core.postprocess import PostprocessParams, postprocess_image
from pipeline.core.probstore import ProbWriter, quantise_prob
from pipeline.nn.classifier import build_classifier_from_config, predict_presence_tta
from pipeline.nn.inference import iter_batches, predict_tta_outputs
from pipeline.nn.keras_backend import keras
from pipeline.nn.model import build_model
from pipeline.nn.weights import load_best_weights
from pipeline.run.image_cache import ImageCache, build_cache
from pipeline.run.prediction import fold_weights

log = logging.getLogger(__name__)

# JPEG decoding and resizing release the GIL: one thread per core (3,698 Clouds test
# images of 1400x2100 take minutes on two).
CACHE_WORKERS = os.cpu_count() or 2


def build_prediction_model(config: Config, n_classes: int) -> keras.Model:
    """The segmentation model of ``config`` for prediction at ``data.image_size``."""
    fixed = config.data.image_size if config.model.architecture == "PSPNet" else None
    # The fold weights replace every layer, so no pretrained encoder is read.
    return build_model(config.with_overrides(["model.encoder_weights=null"]), n_classes, fixed)


def predict_folds(
    model: keras.Model,
    weights: Sequence[Path],
    images: np.ndarray,
    views: Sequence[str],
    how: str,
    batch_size: int,
    accumulator: FoldAccumulator,
    clock: StageClock,
) -> np.ndarray | None:
    """Every fold's TTA prediction of ``images`` (N, H, W, 3) uint8, merged into ``accumulator``.

    Folds outer, batches inner: each fold's weights are loaded once. Returns a presence
    head's (N, C) float32 probabilities, the mean over folds and views, or None for a
    model without one (``model.classification_head``).
    """
    presence: np.ndarray | None = None
    for fold, path in enumerate(weights):
        with clock.stage("load_weights"):
            load_best_weights(model, path)
        started = time.perf_counter()
        for batch in iter_batches(len(images), batch_size):
            start, stop = int(batch[0]), int(batch[-1]) + 1
            with clock.stage("network"):
                probs, head = predict_tta_outputs(model, np.asarray(images[start:stop]), views, how)
            with clock.stage("accumulate"):
                accumulator.add(start, probs)
                if head is not None:
                    if presence is None:
                        presence = np.zeros((len(images), head.shape[1]), dtype=np.float64)
                    presence[start:stop] += head
        rate = len(images) / max(time.perf_counter() - started, 1e-9)
        log.info("fold %d: %d images predicted (%.2f images/s)", fold, len(images), rate)
    return None if presence is None else (presence / len(weights)).astype(np.float32)


def predict_presence(
    config: Config, image_ids: Sequence[str], n_classes: int, cache_dir: Path, clock: StageClock
) -> np.ndarray:
    """Classifier presence probabilities (N, C) float32, the mean over its folds."""
    weights = fold_weights(config, CLASSIFIER_STAGE)
    with clock.stage("cache"):
        cache = build_cache(
            cache_dir,
            "test",
            Path(config.data.test_images),
            image_ids,
            config.classifier.image_size,
            workers=CACHE_WORKERS,
        )
    with clock.stage("build_model"):
        # The fold weights replace every layer, so no pretrained file is read.
        model = build_classifier_from_config(
            config.with_overrides(["classifier.weights=null"]), n_classes
        )
    total = np.zeros((len(image_ids), n_classes), dtype=np.float64)
    for path in weights:
        with clock.stage("load_weights"):
            load_best_weights(model, path)
        with clock.stage("classifier"):
            for batch in iter_batches(len(image_ids), config.tta.batch_size):
                images = np.asarray(cache.images[batch[0] : batch[-1] + 1])
                total[batch] += predict_presence_tta(model, images, config.tta.views)
    return (total / len(weights)).astype(np.float32)


def encode_predictions(
    cache: ImageCache,
    accumulator: FoldAccumulator,
    classes: Sequence[str],
    params: Mapping[str, PostprocessParams],
    submission_size: Sequence[int] | None,
    presence: np.ndarray | None,
    batch_size: int,
    store: ProbWriter | None = None,
    at_least_one: bool = False,
) -> pd.DataFrame:
    """Canonical table (image_id, class_name, rle) of the post-processed merged probs.

    Each image's merged prob is resized to ``submission_size`` (None: its original
    size), quantised like the OOF store (``probstore.quantise_prob``) and post-processed
    per class; ``presence`` (N, C) is the classifier's probability for gated classes.
    The quantised probs also go to ``store`` when given (an ensemble blends them), and
    ``at_least_one`` applies the rule of ``postprocess.postprocess_image``.
    """
    rows: list[tuple[str, str, str]] = []
    settings = [params[name] for name in classes]
    for batch in iter_batches(len(cache.image_ids), batch_size):
        start, stop = int(batch[0]), int(batch[-1]) + 1
        merged = accumulator.merged(start, stop)
        for offset, prob in enumerate(merged):
            i = start + offset
            height, width = cache.original_sizes[i]
            target = submission_size or (int(height), int(width))
            q = quantise_prob(resize_probs(prob, target))
            if store is not None:
                store.add(cache.image_ids[i], q)
            masks = postprocess_image(
                q.transpose(2, 0, 1),
                settings,
                None if presence is None else presence[i],
                at_least_one,
            )
            image_id = cache.image_ids[i]
            rows.extend(
                (image_id, name, text)
                for name, text in zip(classes, rle.encode_batch(masks), strict=True)
            )
    return pd.DataFrame(rows, columns=["image_id", "class_name", "rle"])
