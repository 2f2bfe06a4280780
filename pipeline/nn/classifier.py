"""The presence classifier: image -> one probability per class that its mask is non-empty.

Framework layer. The model is any segmentation-models backbone (or Keras' Xception)
without its top, behind the same ``ChannelAffine`` input normalisation as the
segmentation models (so it takes raw 0-255 RGB), then global average pooling, dropout
and one sigmoid per class. Training samples are whole cached images, augmented; their
labels come from the unaugmented masks (the mask table), so an augmentation that pushes
a small mask out of the frame does not change the label.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd

from pipeline.core.config import Config
from pipeline.core.folds import presence_matrix
from pipeline.core.layout import CLASSIFIER_STAGE as STAGE
from pipeline.core.sample_order import SampleOrder
from pipeline.core.tta import orientation_groups, stack_views, valid_views
from pipeline.nn.data import batch_for_replicas, reseed_augmentation, sample_numbers
from pipeline.nn.inference import accepts_swapped, predict_on_replicas
from pipeline.nn.keras_backend import BACKBONE_MODULES, keras, producing_layer, sm, tf
from pipeline.nn.model import (
    ChannelAffine,
    encoder_layers,
    preprocessing_affine,
    resolve_encoder_weights,
    set_bn_momentum,
    set_imagenet_statistics,
)
from pipeline.nn.weights import load_weights_by_name
from pipeline.run.image_cache import ImageCache

log = logging.getLogger(__name__)

XCEPTION = "xception"
# Keras' Xception expects inputs scaled to [-1, 1] (the "tf" mode of preprocess_input).
XCEPTION_AFFINE = (np.eye(3) / 127.5, np.full(3, -1.0))
POOLINGS = ("avg", "max", "avgmax")


def list_classifier_backbones() -> list[str]:
    """Every valid ``classifier.backbone``: segmentation-models' backbones plus xception."""
    return [*sm.Backbones.models_names(), XCEPTION]


def classifier_fold_dir(config: Config, fold: int) -> Path:
    """``runs/<experiment>/classifier/fold_<fold>``: one classifier fold's outputs."""
    return config.fold_dir(fold, STAGE)


def presence_labels(
    table: pd.DataFrame, classes: Sequence[str], image_ids: Sequence[str]
) -> np.ndarray:
    """(len(image_ids), C) float32 in {0, 1}: 1 where the image's class mask is non-empty.

    ``table`` is the canonical mask table (``image_id``, ``class_name``, ``rle``; an
    empty or missing RLE is absent). KeyError names image ids the table lacks.
    """
    presence = presence_matrix(table, classes).set_index("image_id")
    missing = [i for i in image_ids if i not in presence.index]
    if missing:
        raise KeyError(f"{len(missing)} image ids have no rows in the mask table: {missing[:5]}")
    return presence.loc[list(image_ids), list(classes)].to_numpy(dtype=np.float32)


def _build_backbone(backbone: str, shape: tuple[int, int, int], weights: str | None) -> Any:
    if backbone == XCEPTION:
        return keras.applications.Xception(include_top=False, weights=weights, input_shape=shape)
    return sm.Backbones.get_backbone(
        backbone,
        input_shape=shape,
        weights=weights,
        include_top=False,
        **BACKBONE_MODULES,
    )


def build_classifier(
    backbone: str,
    n_classes: int,
    image_size: Sequence[int],
    weights: str | None = None,
    dropout: float = 0.0,
    bn_momentum: float | None = None,
    pooling: str = "avg",
    multiscale: bool = False,
) -> keras.Model:
    """A presence classifier: (N, H, W, 3) 0-255 RGB -> (N, n_classes) float32 in [0, 1].

    ``image_size`` [H, W] fixes the input shape. ``weights``: ``"imagenet"``, None, or a
    local weights file of the backbone, loaded by layer name (layers it lacks are
    skipped). ``bn_momentum`` overrides every BatchNormalization's momentum. ``pooling``
    of the last feature map: ``avg``, ``max`` (a small region of a class still fires),
    or ``avgmax``, both concatenated (the pooling of many top Kaggle classifiers).
    ``multiscale`` pools the last feature map of every encoder stage (strides 2, 4, ...
    32, see ``stage_outputs``) and concatenates them, so that the head also sees the
    colour and texture statistics of the shallow stages, not only what survives to the
    deepest one; it also gives every stage a short gradient path when training from
    scratch.
    """
    valid = list_classifier_backbones()
    if backbone not in valid:
        raise ValueError(f"classifier.backbone must be one of {valid}; got {backbone!r}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1; got {n_classes}")
    if pooling not in POOLINGS:
        raise ValueError(f"classifier.pooling must be one of {list(POOLINGS)}; got {pooling!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"classifier.dropout must be in [0, 1); got {dropout}")
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"classifier.image_size must be [H, W] > 0; got {list(image_size)}")
    named_weights, local_file = resolve_encoder_weights(weights, "classifier.weights")
    shape = (int(image_size[0]), int(image_size[1]), 3)
    base = _build_backbone(backbone, shape, named_weights)
    if local_file is not None:
        load_weights_by_name(base, local_file)
        log.info("classifier backbone weights loaded by layer name from %s", local_file)
    if named_weights != "imagenet":
        set_imagenet_statistics(base)
    matrix, offset = XCEPTION_AFFINE if backbone == XCEPTION else preprocessing_affine(backbone)
    inputs = keras.Input(shape=shape, name="image")
    x = ChannelAffine(matrix.tolist(), offset.tolist(), name="normalise")(inputs)
    if multiscale:
        stages = stage_outputs(base)
        # The same layers, with every stage's output exposed; it keeps the backbone's
        # name, so weight files and copy_segmentation_encoder find it as before.
        maps = keras.Model(base.inputs, list(stages.values()), name=base.name)(x)
        pooled = [
            _global_pool(m, pooling, f"pool_s{stride}")
            for m, stride in zip(maps, stages, strict=True)
        ]
        x = keras.layers.Concatenate(name="pool")(pooled)
    else:
        x = _global_pool(base(x), pooling, "pool")
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    # float32 output even under mixed precision, for stable probabilities and losses.
    outputs = keras.layers.Dense(n_classes, activation="sigmoid", dtype="float32", name="presence")(
        x
    )
    model = keras.Model(inputs, outputs, name=f"classifier_{backbone}")
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    return model


def _global_pool(x: Any, pooling: str, name: str) -> Any:
    """Global ``pooling`` (avg, max or avgmax) of a feature map, as a layer named ``name``."""
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=name)(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=name)(x)
    both = [
        keras.layers.GlobalAveragePooling2D(name=f"{name}_avg")(x),
        keras.layers.GlobalMaxPooling2D(name=f"{name}_max")(x),
    ]
    return keras.layers.Concatenate(name=name)(both)


def _stride(size: tuple[int, int], input_size: tuple[int, int]) -> int | None:
    # The nearest power of two: "same" convolutions give ceil(n / stride), "valid" ones
    # (Xception, Inception) a few pixels less.
    strides = {2 ** round(math.log2(m / n)) for n, m in zip(size, input_size, strict=True)}
    return strides.pop() if len(strides) == 1 else None


def _stage_layers(base: keras.Model) -> dict[int, keras.layers.Layer]:
    input_size = (int(base.inputs[0].shape[1]), int(base.inputs[0].shape[2]))
    top = producing_layer(base.outputs[-1])
    last: dict[int, keras.layers.Layer] = {}
    deepest = 0
    for layer in base.layers:  # in topological order
        shape = getattr(layer.output, "shape", None)
        # Padding is not a stage's output, nor ResNeXt's channel-group slices (Lambda).
        if isinstance(layer, (keras.layers.ZeroPadding2D, keras.layers.Lambda)):
            continue
        if shape is None or len(shape) != 4:
            continue
        if not shape[1] or not shape[2] or (shape[1] == shape[2] == 1 and layer is not top):
            continue  # squeeze-and-excitation vectors are not stages
        stride = _stride((int(shape[1]), int(shape[2])), input_size)
        # Maps only shrink along an encoder: a larger one after a smaller is padding.
        if stride is not None and stride >= max(deepest, 2):
            deepest = stride
            last[stride] = layer  # the last layer at each resolution ends its stage
    return last


def stage_outputs(base: keras.Model) -> dict[int, Any]:
    """The last feature map of every stage of a backbone, by output stride, shallow to
    deep (e.g. strides 2, 4, 8, 16, 32), the deepest being the backbone's own output.

    Found from the layer graph (the last layer at each resolution), so it serves every
    backbone, Xception included; for segmentation-models' backbones these are the
    layers its decoders take as skip connections.
    """
    layers = _stage_layers(base)
    if not layers or layers[max(layers)] is not producing_layer(base.outputs[-1]):
        raise ValueError(
            f"backbone {base.name}: its output is not the last layer of its deepest stage"
        )
    return {stride: layer.output for stride, layer in layers.items()}


def stage_strides(base: keras.Model) -> list[int]:
    """The output strides of a backbone's stages, shallow to deep (e.g. [2, 4, 8, 16, 32])."""
    return list(stage_outputs(base))


def copy_segmentation_encoder(classifier: keras.Model, segmentation: keras.Model) -> int:
    """Copy the encoder of a segmentation model into the classifier's backbone.

    Layers are matched by name (segmentation-models builds both from the same backbone
    function); returns the number of layers copied. A shape mismatch, or no common
    layer at all (another backbone), is an error.
    """
    source = {layer.name: layer for layer in encoder_layers(segmentation)}
    base = next(layer for layer in classifier.layers if isinstance(layer, keras.Model))
    copied = 0
    for layer in base.layers:
        src = source.get(layer.name)
        if src is None or not layer.weights:
            continue
        values = src.get_weights()
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(
                f"encoder layer {layer.name!r}: segmentation weights {[v.shape for v in values]}"
                f" do not fit the classifier's {expected}"
            )
        layer.set_weights(values)
        copied += 1
    if copied == 0:
        raise ValueError(
            f"no layer of the segmentation encoder ({segmentation.name}) matches the "
            f"classifier backbone ({base.name}); use the same backbone for both"
        )
    return copied


def build_classifier_from_config(config: Config, n_classes: int) -> keras.Model:
    """The configured classifier (``classifier.*`` and ``model.bn_momentum``).

    Call inside the strategy scope when training.
    """
    c = config.classifier
    return build_classifier(
        c.backbone,
        n_classes,
        c.image_size,
        weights=c.weights,
        dropout=c.dropout,
        bn_momentum=config.model.bn_momentum,
        pooling=c.pooling,
        multiscale=c.multiscale_pooling,
    )


def make_presence_metrics(n_classes: int) -> list[keras.metrics.Metric]:
    """Per-class ROC AUC averaged over classes (``auc``) and binary accuracy at 0.5."""
    return [
        keras.metrics.AUC(multi_label=True, num_labels=n_classes, name="auc"),
        keras.metrics.BinaryAccuracy(threshold=0.5, name="accuracy"),
    ]


class ImageSampler:
    """Draws one training image: a whole cached image, augmented.

    Deterministic per sample: the augmentation is seeded from (seed, sample counter).
    """

    def __init__(self, cache: ImageCache, augment: A.Compose | None, seed: int) -> None:
        self.cache = cache
        self.augment = augment
        self.seed = seed
        self._lock = threading.Lock()

    def __call__(self, index: np.int64, counter: np.int64) -> np.ndarray:
        image = np.ascontiguousarray(self.cache.images[int(index)])
        if self.augment is None:
            return image
        rng = np.random.default_rng([self.seed, int(counter)])
        # One pipeline object serves the parallel map; seeding and calling must not interleave.
        with self._lock:
            reseed_augmentation(self.augment, rng)
            return self.augment(image=image)["image"]


def _check_labels(cache: ImageCache, labels: np.ndarray) -> None:
    if labels.ndim != 2 or labels.shape[0] != len(cache.image_ids):
        raise ValueError(
            f"labels must be (n_cached_images, C) = ({len(cache.image_ids)}, C), one row per "
            f"cache row; got shape {labels.shape}"
        )


def make_presence_train_dataset(
    sampler: ImageSampler,
    indices: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    num_parallel_calls: int,
    prefetch: int,
    start: int = 0,
) -> tf.data.Dataset:
    """Endless shuffled batches of (image float32 (B,H,W,3) 0-255, label float32 (B,C)).

    ``indices`` are cache rows to draw from; ``labels`` (n_cached_images, C) has one row
    per cache row. Sample ``n`` (from ``start``) is a pure function of ``(seed, n)``, as
    in ``data.make_train_dataset``.
    """
    _check_labels(sampler.cache, labels)
    height, width = sampler.cache.images.shape[1:3]
    table = tf.constant(labels, dtype=tf.float32)
    order = SampleOrder(indices, seed)

    def draw(n: np.int64) -> tuple[np.ndarray, np.int64]:
        index = order(n)
        return sampler(index, n), index

    def load(n: Any) -> tuple[Any, Any]:
        image, index = tf.numpy_function(draw, [n], [tf.uint8, tf.int64])
        image.set_shape((height, width, 3))
        index.set_shape(())  # Keras 3 wants every element's rank known
        return tf.cast(image, tf.float32), tf.gather(table, index)

    ds = sample_numbers(start).map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(prefetch)


def make_presence_eval_dataset(
    cache: ImageCache,
    indices: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    replicas: int = 1,
) -> tf.data.Dataset:
    """Batches of whole cached images (float32 0-255) and labels (B, C), in order, once.

    ``batch_size`` is the global batch; no batch is smaller than ``replicas``.
    """
    _check_labels(cache, labels)
    height, width = cache.images.shape[1:3]
    table = tf.constant(labels, dtype=tf.float32)
    images = cache.images

    def load(index: np.int64) -> np.ndarray:
        return np.ascontiguousarray(images[int(index)])

    def load_tf(index: Any) -> tuple[Any, Any]:
        image = tf.numpy_function(load, [index], tf.uint8)
        image.set_shape((height, width, 3))
        return tf.cast(image, tf.float32), tf.gather(table, index)

    ds = tf.data.Dataset.from_tensor_slices(np.asarray(indices, dtype=np.int64))
    ds = ds.map(load_tf, num_parallel_calls=2, deterministic=True)
    return batch_for_replicas(ds, len(indices), batch_size, replicas).prefetch(2)


def predict_presence_tta(
    model: keras.Model, images: np.ndarray, views: Sequence[str]
) -> np.ndarray:
    """Presence probabilities of a batch (N, H, W, 3) uint8, mean over TTA views: (N, C) float32.

    The views of one orientation go through the network in one call. A view does not
    change which classes an image contains, so the outputs need no inversion. On
    non-square inputs the views that swap H and W run when the model accepts (W, H)
    inputs, else they are dropped.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3); got shape {images.shape}")
    height, width = images.shape[1], images.shape[2]
    views = valid_views(views, height, width, rotate=accepts_swapped(model, height, width))
    preds = [
        predict_on_replicas(model, stack_views(images, group).astype(np.float32))
        for group in orientation_groups(views)
    ]
    return np.concatenate(preds).reshape(len(views), len(images), -1).mean(axis=0)
