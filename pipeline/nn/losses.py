"""Keras losses for sigmoid segmentation, as reloadable Keras objects, and what a
segmentation model is compiled with (the masks' metrics live in ``nn.metrics``).

Every tensor here is channels-last (N, H, W, C) with ``y_pred`` sigmoid probabilities;
float16 predictions (mixed precision) are cast to float32 first.

The overlap losses follow segmentation_models' defaults (``per_image=False``,
``smooth=1e-5``): intersection and sums run over the batch and both spatial axes for
each class, then the per-class scores are averaged. With ``per_image=True`` the
score is computed per image and class and averaged over both. Under
``MirroredStrategy`` each replica pools its own share of the batch and Keras averages
the replicas' losses, as with segmentation_models' losses.
"""

from collections.abc import Callable
from typing import Any

from pipeline.nn.keras_backend import LOSS_REDUCTION, binary_crossentropy, epsilon, keras, tf
from pipeline.nn.metrics import as_float32, get_metrics
from pipeline.nn.model import MASK_OUTPUT, PRESENCE_OUTPUT, has_presence_head, is_softmax

OVERLAP_SMOOTH = 1e-5

_register = keras.utils.register_keras_serializable(package="foldseg")


def _mean(x: tf.Tensor, empty: float = 0.0) -> tf.Tensor:
    """Mean of every element; ``empty`` (not NaN) for an empty tensor. Under
    MirroredStrategy a replica gets an empty slice of a final partial batch, and its NaN
    would poison the loss of the whole batch. Scores use ``empty=1`` (as the pooled
    score of an empty batch, smooth / smooth), so every loss of an empty batch is 0."""
    size = tf.cast(tf.size(x), x.dtype)
    return tf.where(size > 0, tf.math.divide_no_nan(tf.reduce_sum(x), size), empty)


def _reduce_axes(per_image: bool) -> list[int]:
    return [1, 2] if per_image else [0, 1, 2]


def soft_jaccard_score(
    y_true: tf.Tensor, y_pred: tf.Tensor, smooth: float = OVERLAP_SMOOTH, per_image: bool = False
) -> tf.Tensor:
    """Soft Jaccard index of (N, H, W, C) truth and probabilities, a float32 scalar.

    ``(sum(t p) + smooth) / (sum(t) + sum(p) - sum(t p) + smooth)`` per class (and per
    image when ``per_image``), averaged; as segmentation_models' ``iou_score``.
    """
    t, p = as_float32(y_true, y_pred)
    axes = _reduce_axes(per_image)
    intersection = tf.reduce_sum(t * p, axis=axes)
    union = tf.reduce_sum(t + p, axis=axes) - intersection
    return _mean((intersection + smooth) / (union + smooth), empty=1.0)


def soft_dice_score(
    y_true: tf.Tensor, y_pred: tf.Tensor, smooth: float = OVERLAP_SMOOTH, per_image: bool = False
) -> tf.Tensor:
    """Soft Dice (F1) of (N, H, W, C) truth and probabilities, a float32 scalar.

    ``(2 sum(t p) + smooth) / (sum(t) + sum(p) + smooth)`` per class (and per image when
    ``per_image``), averaged; as segmentation_models' ``f_score`` with beta 1.
    """
    t, p = as_float32(y_true, y_pred)
    axes = _reduce_axes(per_image)
    intersection = tf.reduce_sum(t * p, axis=axes)
    total = tf.reduce_sum(t + p, axis=axes)
    return _mean((2.0 * intersection + smooth) / (total + smooth), empty=1.0)


def _binary_crossentropy(y_true: tf.Tensor, y_pred: tf.Tensor, label_smoothing: float) -> tf.Tensor:
    t, p = as_float32(y_true, y_pred)
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return _mean(binary_crossentropy(t, p))


def _binary_focal(y_true: tf.Tensor, y_pred: tf.Tensor, gamma: float, alpha: float) -> tf.Tensor:
    # segmentation_models' binary_focal_loss: alpha weighs positives, 1 - alpha negatives.
    t, p = as_float32(y_true, y_pred)
    eps = epsilon()
    p = tf.clip_by_value(p, eps, 1.0 - eps)
    positive = -t * alpha * tf.pow(1.0 - p, gamma) * tf.math.log(p)
    negative = -(1.0 - t) * (1.0 - alpha) * tf.pow(p, gamma) * tf.math.log(1.0 - p)
    return _mean(positive + negative)


class _OverlapLoss(keras.losses.Loss):
    """Shared arguments of the overlap losses: ``smooth`` and ``per_image``."""

    default_name = ""
    default_per_image = False

    def __init__(
        self,
        smooth: float = OVERLAP_SMOOTH,
        per_image: bool | None = None,
        name: str | None = None,
        reduction: str = LOSS_REDUCTION,
    ) -> None:
        super().__init__(name=name or self.default_name, reduction=reduction)
        self.smooth = smooth
        self.per_image = self.default_per_image if per_image is None else per_image

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "smooth": self.smooth, "per_image": self.per_image}


@_register
class JaccardLoss(_OverlapLoss):
    """``1 - soft_jaccard_score``: the reference recipe's loss."""

    default_name = "jaccard"

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return 1.0 - soft_jaccard_score(y_true, y_pred, self.smooth, self.per_image)


@_register
class DiceLoss(_OverlapLoss):
    """``1 - soft_dice_score``."""

    default_name = "dice"

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return 1.0 - soft_dice_score(y_true, y_pred, self.smooth, self.per_image)


class _BceOverlapLoss(_OverlapLoss):
    """Mean binary cross-entropy plus an overlap loss, optionally with label smoothing."""

    def __init__(
        self,
        smooth: float = OVERLAP_SMOOTH,
        per_image: bool | None = None,
        label_smoothing: float = 0.0,
        name: str | None = None,
        reduction: str = LOSS_REDUCTION,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
        super().__init__(smooth=smooth, per_image=per_image, name=name, reduction=reduction)
        self.label_smoothing = label_smoothing

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@_register
class BceJaccardLoss(_BceOverlapLoss):
    """Binary cross-entropy + Jaccard loss (segmentation_models' ``bce_jaccard_loss``)."""

    default_name = "bce_jaccard"

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        bce = _binary_crossentropy(y_true, y_pred, self.label_smoothing)
        return bce + 1.0 - soft_jaccard_score(y_true, y_pred, self.smooth, self.per_image)


@_register
class BceDiceLoss(_BceOverlapLoss):
    """Binary cross-entropy + Dice loss (segmentation_models' ``bce_dice_loss``)."""

    default_name = "bce_dice"

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        bce = _binary_crossentropy(y_true, y_pred, self.label_smoothing)
        return bce + 1.0 - soft_dice_score(y_true, y_pred, self.smooth, self.per_image)


@_register
class FocalDiceLoss(_OverlapLoss):
    """Binary focal loss + Dice loss (segmentation_models' ``binary_focal_dice_loss``)."""

    default_name = "focal_dice"

    def __init__(
        self,
        smooth: float = OVERLAP_SMOOTH,
        per_image: bool | None = None,
        gamma: float = 2.0,
        alpha: float = 0.25,
        name: str | None = None,
        reduction: str = LOSS_REDUCTION,
    ) -> None:
        super().__init__(smooth=smooth, per_image=per_image, name=name, reduction=reduction)
        self.gamma = gamma
        self.alpha = alpha

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        focal = _binary_focal(y_true, y_pred, self.gamma, self.alpha)
        return focal + 1.0 - soft_dice_score(y_true, y_pred, self.smooth, self.per_image)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha}


def lovasz_hinge(y_true: tf.Tensor, y_pred: tf.Tensor, per_image: bool = True) -> tf.Tensor:
    """The Lovász hinge (Berman et al. 2018) of (N, H, W, C) truth and sigmoid
    probabilities, a float32 scalar: a convex surrogate of the Jaccard loss on the logits.

    Each image and class (``per_image``), or each class over the whole batch, is one
    row: hinge errors ``1 - logit * sign`` sorted in decreasing order, weighted by the
    Lovász extension's gradient of the Jaccard loss, summed; rows are averaged. The
    logits are recovered from the probabilities (clipped to [1e-7, 1 - 1e-7]).
    """
    t, p = as_float32(y_true, y_pred)
    eps = 1e-7
    p = tf.clip_by_value(p, eps, 1.0 - eps)
    logits = tf.math.log(p) - tf.math.log1p(-p)
    channels = tf.shape(t)[-1]
    if per_image:  # rows: (image, class)
        t = tf.reshape(tf.transpose(t, [0, 3, 1, 2]), [-1, tf.shape(t)[1] * tf.shape(t)[2]])
        logits = tf.reshape(tf.transpose(logits, [0, 3, 1, 2]), tf.shape(t))
    else:  # rows: classes, over every pixel of the batch
        t = tf.reshape(tf.transpose(t, [3, 0, 1, 2]), [channels, -1])
        logits = tf.reshape(tf.transpose(logits, [3, 0, 1, 2]), tf.shape(t))
    errors = 1.0 - logits * (2.0 * t - 1.0)
    order = tf.argsort(errors, axis=1, direction="DESCENDING")
    errors_sorted = tf.gather(errors, order, batch_dims=1)
    truth_sorted = tf.gather(t, order, batch_dims=1)
    positives = tf.reduce_sum(truth_sorted, axis=1, keepdims=True)
    intersection = positives - tf.cumsum(truth_sorted, axis=1)
    union = positives + tf.cumsum(1.0 - truth_sorted, axis=1)
    jaccard = 1.0 - intersection / union
    gradient = tf.concat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], axis=1)
    return _mean(tf.reduce_sum(tf.nn.relu(errors_sorted) * gradient, axis=1))


@_register
class LovaszHingeLoss(_OverlapLoss):
    """``lovasz_hinge``, per image and class by default (the reference implementation's
    choice); ``smooth`` is accepted for a uniform signature and unused."""

    default_name = "lovasz"
    default_per_image = True

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return lovasz_hinge(y_true, y_pred, self.per_image)


def split_exclusive(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """A softmax model's (truth, probabilities, valid) as float32 (N, H, W, C+1) tensors
    with the background as channel 0, and (N, H, W, 1) ``valid`` (0 at void pixels).

    ``y_true`` is (N, H, W, C+1): the C class masks and a last channel that is 1 at void
    pixels (``data.CropSampler`` with ``exclusive``); ``y_pred`` the C foreground
    probabilities the model outputs (its background is ``1 - sum``, clipped). Truth and
    probabilities are zero at void pixels.
    """
    t, p = as_float32(y_true, y_pred)
    valid = 1.0 - t[..., -1:]
    t = t[..., :-1]
    t_background = tf.clip_by_value(1.0 - tf.reduce_sum(t, axis=-1, keepdims=True), 0.0, 1.0)
    p_background = tf.clip_by_value(1.0 - tf.reduce_sum(p, axis=-1, keepdims=True), 0.0, 1.0)
    t_full = tf.concat([t_background, t], axis=-1) * valid
    p_full = tf.concat([p_background, p], axis=-1) * valid
    return t_full, p_full, valid


def exclusive_crossentropy(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Categorical cross-entropy of a softmax model, averaged over the non-void pixels
    (0 when every pixel is void), a float32 scalar."""
    t, p, valid = split_exclusive(y_true, y_pred)
    eps = epsilon()
    per_pixel = -tf.reduce_sum(t * tf.math.log(tf.clip_by_value(p, eps, 1.0)), axis=-1)
    return tf.math.divide_no_nan(tf.reduce_sum(per_pixel), tf.reduce_sum(valid))


@_register
class ExclusiveCeDiceLoss(_OverlapLoss):
    """A softmax model's loss: categorical cross-entropy + ``1 - soft Dice`` of the C
    foreground classes (the background's Dice would be near 1 and say little), void
    pixels out of both. Dice rather than Jaccard because the score it trains for is the
    Kaggle Dice; the cross-entropy keeps every pixel's gradient where the Dice of a
    batch's large classes flattens."""

    default_name = "cce_dice"

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        t, p, _ = split_exclusive(y_true, y_pred)
        dice = soft_dice_score(t[..., 1:], p[..., 1:], self.smooth, self.per_image)
        return exclusive_crossentropy(y_true, y_pred) + 1.0 - dice


LOSSES: dict[str, Callable[..., keras.losses.Loss]] = {
    "jaccard": JaccardLoss,
    "dice": DiceLoss,
    "bce_jaccard": BceJaccardLoss,
    "bce_dice": BceDiceLoss,
    "focal_dice": FocalDiceLoss,
    "lovasz": LovaszHingeLoss,
}


def get_loss(name: str, **kwargs: Any) -> keras.losses.Loss:
    """The loss called ``name`` (one of ``LOSSES``), built with ``kwargs``."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}; got {name!r}")
    return LOSSES[name](**kwargs)


def segmentation_compile_args(
    model: keras.Model,
    loss: str,
    threshold: float,
    min_area: int,
    head_weight: float | None = None,
) -> dict[str, Any]:
    """``model.compile`` keyword arguments for a segmentation model: the loss ``loss`` and
    the recipe's metrics on the masks; with a presence head (``model.classification_head``)
    also binary cross-entropy on ``presence``, weighted ``head_weight``, and no metric on
    it (the masks' metrics, logged with an output prefix, are renamed back by
    ``trainer.fit_resumable``). ``head_weight`` is ``model.classification_head_weight``,
    required with a head. A softmax model (``model.is_softmax``) trains with
    ``ExclusiveCeDiceLoss`` whatever ``loss`` says, and its metrics score argmax masks."""
    exclusive = is_softmax(model)
    mask_loss = ExclusiveCeDiceLoss() if exclusive else get_loss(loss)
    metrics = get_metrics(threshold, min_area, exclusive=exclusive)
    if not has_presence_head(model):
        return {"loss": mask_loss, "metrics": metrics}
    if head_weight is None:
        raise ValueError("a model with a presence head needs model.classification_head_weight")
    return {
        "loss": {MASK_OUTPUT: mask_loss, PRESENCE_OUTPUT: keras.losses.BinaryCrossentropy()},
        "loss_weights": {MASK_OUTPUT: 1.0, PRESENCE_OUTPUT: float(head_weight)},
        "metrics": {MASK_OUTPUT: metrics},
    }


def with_presence_targets(dataset: tf.data.Dataset, model: keras.Model) -> tf.data.Dataset:
    """``dataset`` of (images, masks) batches, with the presence head's target added when
    ``model`` has one: (images, {masks, presence}); presence is 1 where the (cropped,
    augmented) mask of a class has any pixel above 0.5."""
    if not has_presence_head(model):
        return dataset

    n_classes = int(model.get_layer(MASK_OUTPUT).output.shape[-1])

    def split(images: tf.Tensor, masks: tf.Tensor) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        # A softmax model's targets carry the void channel last: not a class.
        classes = masks[..., :n_classes]
        present = tf.cast(tf.reduce_max(classes, axis=[1, 2]) > 0.5, tf.float32)
        return images, {MASK_OUTPUT: masks, PRESENCE_OUTPUT: present}

    return dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
