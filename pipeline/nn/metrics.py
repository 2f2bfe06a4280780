"""Keras metrics of the masks, as reloadable Keras objects (framework layer).

The formulas are defined once in ``pipeline.core.metrics`` (numpy); these compute the
same quantities with tf ops over a whole epoch (float64 sums) and are tested against
them. A probability counts as foreground at or above the threshold, as everywhere.
"""

import abc
from typing import Any

from pipeline.nn.keras_backend import keras, tf

DICE_METRIC_SMOOTH = 1.0

_register = keras.utils.register_keras_serializable(package="foldseg")


def as_float32(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Both tensors as float32 (float16 predictions of mixed precision included)."""
    return tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)


def _predicted_masks(y_pred: tf.Tensor, threshold: float, min_area: int) -> tf.Tensor:
    """float32 (N, H, W, C) {0, 1}: ``prob >= threshold`` (``metrics.above_threshold``),
    masks under min_area emptied."""
    pred = tf.cast(tf.cast(y_pred, tf.float32) >= threshold, tf.float32)
    area = tf.reduce_sum(pred, axis=[1, 2], keepdims=True)
    return pred * tf.cast(area >= float(min_area), tf.float32)


def _truth_masks(y_true: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.cast(y_true, tf.float32) > 0.5, tf.float32)


def _exclusive_parts(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A softmax model's (truth (N, H, W, C+1) with the void channel last, foreground
    probabilities (N, H, W, C)) as (truth, argmax masks), both float32 (N, H, W, C) and
    zero at void pixels (``core.exclusive.argmax_masks``, ``without_void``)."""
    t, p = as_float32(y_true, y_pred)
    valid = 1.0 - t[..., -1:]
    background = 1.0 - tf.reduce_sum(p, axis=-1, keepdims=True)
    label = tf.argmax(tf.concat([background, p], axis=-1), axis=-1)
    pred = tf.one_hot(label, tf.shape(p)[-1] + 1, dtype=tf.float32)[..., 1:]
    return t[..., :-1] * valid, pred * valid


def _reject_sample_weight(metric: keras.metrics.Metric, sample_weight: tf.Tensor | None) -> None:
    if sample_weight is not None:
        raise ValueError(f"{metric.name} does not support sample_weight; got {sample_weight}")


class _SumMetric(keras.metrics.Metric):
    """A metric whose state is float64 sums: exact enough over a whole epoch."""

    def _add_sum(self, name: str) -> tf.Variable:
        return self.add_weight(name=name, shape=(), initializer="zeros", dtype=tf.float64)


@_register
class Dice(_SumMetric):
    """Soft Dice over everything seen since the last reset (``metrics.soft_dice``).

    Accumulates ``sum(t p)`` and ``sum(t) + sum(p)`` over batches, so the epoch value
    equals ``metrics.soft_dice`` of all the epoch's data concatenated.
    """

    def __init__(
        self,
        smooth: float = DICE_METRIC_SMOOTH,
        name: str = "dice",
        dtype: Any = None,
        exclusive: bool = False,
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.smooth = smooth
        self.exclusive = exclusive
        self.intersection = self._add_sum("intersection")
        self.total = self._add_sum("total")

    def update_state(
        self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None
    ) -> None:
        _reject_sample_weight(self, sample_weight)
        t, p = as_float32(y_true, y_pred)
        if self.exclusive:  # soft Dice of the non-void pixels' probabilities
            valid = 1.0 - t[..., -1:]
            t, p = t[..., :-1] * valid, p * valid
        self.intersection.assign_add(tf.cast(tf.reduce_sum(t * p), tf.float64))
        self.total.assign_add(tf.cast(tf.reduce_sum(t) + tf.reduce_sum(p), tf.float64))

    def result(self) -> tf.Tensor:
        smooth = tf.constant(self.smooth, tf.float64)
        score = (2.0 * self.intersection + smooth) / (self.total + smooth)
        return tf.cast(score, self.dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "smooth": self.smooth, "exclusive": self.exclusive}


class _ThresholdMetric(_SumMetric):
    """Mean of a per image-and-class score: accumulates the score sum and the count."""

    def __init__(
        self, threshold: float, min_area: int, name: str, dtype: Any, exclusive: bool = False
    ) -> None:
        if min_area < 0:
            raise ValueError(f"min_area must be >= 0; got {min_area}")
        super().__init__(name=name, dtype=dtype)
        self.threshold = threshold
        self.min_area = min_area
        self.exclusive = exclusive  # softmax: argmax masks (no threshold), void left out
        self.score_sum = self._add_sum("score_sum")
        self.count = self._add_sum("count")

    @abc.abstractmethod
    def _scores(self, truth: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
        """(N, C) float32 scores of binary (N, H, W, C) truth and predicted masks."""

    def update_state(
        self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None
    ) -> None:
        _reject_sample_weight(self, sample_weight)
        if self.exclusive:
            truth, argmax = _exclusive_parts(y_true, y_pred)
            # Argmax masks are 0/1: any threshold in (0, 1] keeps them as they are.
            scores = self._scores(_truth_masks(truth), _predicted_masks(argmax, 0.5, self.min_area))
        else:
            scores = self._scores(
                _truth_masks(y_true), _predicted_masks(y_pred, self.threshold, self.min_area)
            )
        self.score_sum.assign_add(tf.reduce_sum(tf.cast(scores, tf.float64)))
        self.count.assign_add(tf.cast(tf.size(scores), tf.float64))

    def result(self) -> tf.Tensor:
        return tf.cast(tf.math.divide_no_nan(self.score_sum, self.count), self.dtype)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "threshold": self.threshold,
            "min_area": self.min_area,
            "exclusive": self.exclusive,
        }


@_register
class KaggleDice(_ThresholdMetric):
    """Mean Kaggle Dice over all images and classes seen (``metrics.kaggle_dice``)."""

    def __init__(
        self,
        threshold: float = 0.5,
        min_area: int = 0,
        name: str = "kaggle_dice",
        dtype: Any = None,
        exclusive: bool = False,
    ) -> None:
        super().__init__(threshold, min_area, name=name, dtype=dtype, exclusive=exclusive)

    def _scores(self, truth: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
        intersection = tf.reduce_sum(truth * pred, axis=[1, 2])
        total = tf.reduce_sum(truth, axis=[1, 2]) + tf.reduce_sum(pred, axis=[1, 2])
        # Empty prediction on empty truth scores 1 (the Kaggle rule).
        return tf.where(total > 0, tf.math.divide_no_nan(2.0 * intersection, total), 1.0)


@_register
class KaggleAccuracy(_ThresholdMetric):
    """Share of image-class pairs whose presence is right (``metrics.presence_accuracy``)."""

    def __init__(
        self,
        threshold: float = 0.5,
        min_area: int = 0,
        name: str = "kaggle_accuracy",
        dtype: Any = None,
        exclusive: bool = False,
    ) -> None:
        super().__init__(threshold, min_area, name=name, dtype=dtype, exclusive=exclusive)

    def _scores(self, truth: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
        truth_present = tf.reduce_max(truth, axis=[1, 2]) > 0
        pred_present = tf.reduce_max(pred, axis=[1, 2]) > 0
        return tf.cast(tf.equal(truth_present, pred_present), tf.float32)


def get_metrics(
    threshold: float, min_area: int, exclusive: bool = False
) -> list[keras.metrics.Metric]:
    """The recipe's metrics: ``[Dice(), KaggleDice(...), KaggleAccuracy(...)]``; with
    ``exclusive`` (a softmax model) of argmax masks, void pixels left out."""
    return [
        Dice(exclusive=exclusive),
        KaggleDice(threshold, min_area, exclusive=exclusive),
        KaggleAccuracy(threshold, min_area, exclusive=exclusive),
    ]
