"""Re-estimate BatchNorm statistics for the final weights ("precise BatchNorm").

During training each BatchNorm layer keeps an exponential moving average of its batch
statistics, taken while the weights were still changing. In a short run (a few hundred
steps, the CPU-sized configs) the average lags the final weights, and every inference
forward (validation, OOF, test) normalises with stale statistics. ``recalibrate``
replaces each layer's moving mean and variance with the plain average of its batch
statistics over the given batches, computed with the final weights, in the same
training-mode forward that training used (so drop-connect acts as during training).
The first batch overwrites the old statistics, so recalibrating twice from the same
batches gives the same result (a resumed fold repeats it safely). A frozen BatchNorm
layer (``trainable`` False: a frozen encoder part) runs in inference mode in Keras even
in a training-mode call, so it keeps its statistics, as it did in training, and the
layers after it are recalibrated on the features they were trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np

from pipeline.nn.keras_backend import all_layers, keras
from pipeline.nn.weights import copy_model, copy_weights

log = logging.getLogger(__name__)


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of ``model``, nested models included."""
    return [m for m in all_layers(model) if isinstance(m, keras.layers.BatchNormalization)]


def recalibrate(model: keras.Model, batches: Iterable[np.ndarray]) -> int:
    """Set every BatchNorm layer's moving statistics to the mean over ``batches``.

    ``batches`` yields model inputs (N, H, W, 3). Weights other than the moving
    statistics are not changed. Returns the number of batches used (0: nothing done).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    used = 0
    try:
        for batch in batches:
            # moving = moving * m + batch * (1 - m) with m = k / (k + 1): after k + 1
            # batches the moving value is their plain mean (m = 0 discards the old one).
            for layer in layers:
                layer.momentum = used / (used + 1)
            model(np.asarray(batch, dtype=np.float32), training=True)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    return used


def recalibrate_copy(
    model: keras.Model, build: Callable[[], keras.Model], batches: Iterable[np.ndarray]
) -> int:
    """``recalibrate`` on a plain copy (``build()``, outside any distribution strategy),
    then copy the weights back: works whatever strategy ``model`` was built under."""
    plain = copy_model(model, build)
    # Frozen BatchNorm layers stay frozen on the copy (matched by position: the same
    # architecture lists its layers in the same order).
    for source, target in zip(batchnorm_layers(model), batchnorm_layers(plain), strict=True):
        target.trainable = source.trainable
    used = recalibrate(plain, batches)
    copy_weights(plain, model)
    return used
