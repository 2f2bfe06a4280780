"""Model prediction with test-time augmentation, batched over views (framework layer)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from pipeline.core.tta import predict_views, valid_views
from pipeline.nn.keras_backend import keras


def predict_tta(
    model: keras.Model,
    images: np.ndarray,
    views: Sequence[str],
    how: str = "mean",
) -> np.ndarray:
    """Predict a batch (N, H, W, 3) uint8 under every TTA view; (N, H, W, C) float32.

    The views of one orientation go through the network in one call; each view's output
    is inverted before merging. On non-square inputs the quarter turns and the transpose
    run as a second call at (W, H) when the model accepts that shape (a fully
    convolutional one does); otherwise they are dropped.
    """
    height, width = images.shape[1], images.shape[2]
    views = valid_views(views, height, width, rotate=accepts_swapped(model, height, width))
    return predict_views(
        lambda stacked: predict_on_replicas(model, stacked.astype(np.float32)), images, views, how
    )


def accepts_swapped(model: keras.Model, height: int, width: int) -> bool:
    """True where ``model`` takes (N, width, height, 3) inputs: no fixed size, or that one."""
    try:
        fixed_h, fixed_w = model.input_shape[1:3]
    except AttributeError:  # a subclassed model never called yet fixes no input shape
        return True
    return fixed_h in (None, width) and fixed_w in (None, height)


def predict_on_replicas(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    """``model.predict_on_batch`` as float32, safe under a multi-replica strategy.

    A batch is split over the model's replicas; one smaller than the replica count
    would leave a replica an empty slice, which oneDNN's convolution mishandles (see
    ``data.batch_for_replicas``). Such a batch is padded with copies of its last image
    and the padding's outputs dropped: inference is per image, so the rest is unchanged.
    """
    n = len(batch)
    replicas = model.distribute_strategy.num_replicas_in_sync
    if 0 < n < replicas:
        batch = np.concatenate([batch, np.repeat(batch[-1:], replicas - n, axis=0)])
    return np.asarray(model.predict_on_batch(batch), dtype=np.float32)[:n]


def iter_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive index batches covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))
