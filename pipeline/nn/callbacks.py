"""Keras callbacks of the training loop, and the weight average they keep (framework layer).

- ``WeightAverage`` / ``AverageWeights``: an exponential moving average of the weights,
  updated once per applied optimizer step, validated on (``train.ema_decay``);
- ``NanGuard``: stops at the first non-finite loss and says where;
- ``FirstOutputLogs``: a two-output model's (``model.classification_head``) mask
  metrics under their single-output names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.weights import all_trainable


class WeightAverage(tf.Module):
    """An exponential moving average (EMA) of every weight of a model.

    ``update()`` runs after each applied optimizer step (not after each accumulated
    micro-batch): ``shadow = d * shadow + (1 - d) * weight`` with
    ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update, so a short run is not
    dominated by its initial weights (TensorFlow's ExponentialMovingAverage with
    ``num_updates``). BatchNorm statistics are averaged with the rest. ``swap()``
    exchanges the model's weights and the average; the checkpoint saves both.
    """

    def __init__(self, model: keras.Model, decay: float) -> None:
        super().__init__(name="weight_average")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null; got {decay}")
        self.decay = float(decay)
        # One fixed order whatever the layers' trainable flags (they change by phase).
        with all_trainable(model):
            self._weights = list(model.weights)
        with model.distribute_strategy.scope():
            self.shadow = [
                tf.Variable(tf.convert_to_tensor(w), trainable=False, name=f"ema_{i}")
                for i, w in enumerate(self._weights)
            ]
            self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="ema_updates")

    @tf.function
    def update(self) -> None:
        """Move the average one step towards the current weights."""
        self.updates.assign_add(1)
        n = tf.cast(self.updates, tf.float32)
        decay = tf.minimum(tf.constant(self.decay, tf.float32), (1.0 + n) / (10.0 + n))
        for average, weight in zip(self.shadow, self._weights, strict=True):
            d = tf.cast(decay, average.dtype)
            average.assign(average * d + tf.cast(weight, average.dtype) * (1 - d))

    @tf.function
    def swap(self) -> None:
        """Exchange the model's weights and the average."""
        for average, weight in zip(self.shadow, self._weights, strict=True):
            current = tf.identity(tf.convert_to_tensor(weight))
            weight.assign(tf.convert_to_tensor(average))
            average.assign(current)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the model for the block, the trained weights back after."""
        self.swap()
        try:
            yield
        finally:
            self.swap()


class AverageWeights(keras.callbacks.Callback):
    """Updates a ``WeightAverage`` after each applied step; validates with the average."""

    def __init__(self, average: WeightAverage) -> None:
        super().__init__()
        self.average = average
        self.last_iteration = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.last_iteration = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        iteration = int(self.model.optimizer.iterations.numpy())
        if iteration != self.last_iteration:  # an accumulated micro-batch changes nothing
            self.last_iteration = iteration
            self.average.update()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.average.swap()

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self.average.swap()


class NanGuard(keras.callbacks.Callback):
    """Stop at the first non-finite loss and remember where, for a clear error."""

    def __init__(self) -> None:
        super().__init__()
        self.where: str | None = None
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.where = f"epoch {self.epoch + 1}, batch {batch + 1} (loss={loss})"
            self.model.stop_training = True


class FirstOutputLogs(keras.callbacks.Callback):
    """A multi-output model's logs under the single-output names: Keras prefixes the
    metrics of output ``prob`` (``val_prob_dice``); this renames them back
    (``val_dice``) so ``train.monitor``, the history and every callback after it read
    the same keys with or without a presence head. The total ``loss`` stays as it is;
    the outputs' own losses keep their prefixes (``prob_loss``, ``presence_loss``).
    First in the callback list: the logs dict is shared by the callbacks after it."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.prefixes = (f"{output}_", f"val_{output}_")

    def _rename(self, logs: dict[str, Any] | None) -> None:
        if not logs:
            return
        for key in list(logs):
            for prefix in self.prefixes:
                if key.startswith(prefix) and not key.endswith("_loss"):
                    plain = ("val_" if prefix.startswith("val_") else "") + key[len(prefix) :]
                    logs[plain] = logs.pop(key)
                    break

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._rename(logs)

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self._rename(logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._rename(logs)
