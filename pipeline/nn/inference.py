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
    return predict_tta_outputs(model, images, views, how)[0]


def predict_tta_outputs(
    model: keras.Model,
    images: np.ndarray,
    views: Sequence[str],
    how: str = "mean",
) -> tuple[np.ndarray, np.ndarray | None]:
    """``predict_tta``'s masks and, for a model with a presence head
    (``model.classification_head``), its (N, C) float32 presence, the mean over the
    views (a presence needs no inverting); None without a head. One forward per
    orientation group gives both."""
    height, width = images.shape[1], images.shape[2]
    views = valid_views(views, height, width, rotate=accepts_swapped(model, height, width))
    n = len(images)
    presence: list[np.ndarray] = []

    def forward(stacked: np.ndarray) -> np.ndarray:
        outputs = predict_outputs_on_replicas(model, stacked.astype(np.float32))
        if len(outputs) > 1:
            presence.append(outputs[1].reshape(-1, n, outputs[1].shape[-1]))
        return outputs[0]

    masks = predict_views(forward, images, views, how)
    if not presence:
        return masks, None
    return masks, np.concatenate(presence).mean(axis=0, dtype=np.float64).astype(np.float32)


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
    return predict_outputs_on_replicas(model, batch)[0]


def predict_outputs_on_replicas(model: keras.Model, batch: np.ndarray) -> list[np.ndarray]:
    """``predict_on_replicas`` for every output of ``model`` (one array per output)."""
    n = len(batch)
    replicas = model.distribute_strategy.num_replicas_in_sync
    if 0 < n < replicas:
        batch = np.concatenate([batch, np.repeat(batch[-1:], replicas - n, axis=0)])
    outputs = model.predict_on_batch(batch)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return [np.asarray(out, dtype=np.float32)[:n] for out in outputs]


def iter_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive index batches covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))
