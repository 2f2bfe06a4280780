"""Segmentation models from config: any segmentation-models architecture and backbone.

The model takes raw RGB pixel values (0-255, float or uint8) and applies the backbone's
own input normalisation as its first layer, so that data loading, prediction and the
classifier never need to know which backbone is in use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import Config
from pipeline.nn.keras_backend import KERAS3, all_layers, keras, sm, tf
from pipeline.nn.weights import load_weights_by_name

log = logging.getLogger(__name__)

ARCHITECTURES = ("Unet", "FPN", "Linknet", "PSPNet")
DECODER_BLOCK_TYPES = ("upsampling", "transpose")  # segmentation-models' Unet decoders
STRIDE = 32
PSP_STRIDE = 48  # PSPNet with downsample_factor 8 needs sides divisible by 6 * 8
MASK_OUTPUT = "prob"  # the model's (first) output: per-pixel class probabilities
BACKGROUND_SOFTMAX = "softmax"  # activation softmax: the softmax over background + classes
ACTIVATIONS = ("sigmoid", "softmax")
PRESENCE_OUTPUT = "presence"  # model.classification_head's output: per-class presence
DECODER_PREFIXES = (
    "decoder_",
    "center_",
    "final_",
    "fpn_",
    "segm_",
    "upsampling_",
    "aggregation_",
    "psp_",
)


def check_input_size(size: Sequence[int], what: str, stride: int = STRIDE) -> None:
    """Raise ValueError unless both sides of ``size`` ([H, W]) are divisible by ``stride``.

    The message proposes the nearest valid sizes below and above each bad side.
    """
    bad = [(axis, side) for axis, side in zip("HW", size, strict=True) if side % stride]
    if not bad:
        return
    hints = []
    for axis, side in bad:
        low = max(stride, side // stride * stride)
        high = (side // stride + 1) * stride
        hints.append(f"{axis}={side} -> {low} or {high}")
    raise ValueError(
        f"{what} must have sides divisible by {stride}; got {list(size)} "
        f"(nearest valid: {', '.join(hints)})"
    )


@keras.utils.register_keras_serializable(package="foldseg")
class ChannelAffine(keras.layers.Layer):
    """``y = x @ matrix + offset`` over the channel axis: a backbone's input normalisation.

    Every segmentation-models preprocessing (torch, tf, caffe with its RGB->BGR swap,
    identity) is affine in the channels, so one 3x3 matrix and an offset express it.
    """

    def __init__(self, matrix: Sequence[Sequence[float]], offset: Sequence[float], **kwargs: Any):
        super().__init__(**kwargs)
        self.matrix = [list(map(float, row)) for row in matrix]
        self.offset = list(map(float, offset))

    def call(self, inputs: Any) -> Any:
        x = tf.cast(inputs, self.compute_dtype)
        m = tf.constant(self.matrix, dtype=self.compute_dtype)
        b = tf.constant(self.offset, dtype=self.compute_dtype)
        return tf.tensordot(x, m, axes=[[-1], [0]]) + b

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "matrix": self.matrix, "offset": self.offset}


def preprocessing_affine(backbone: str) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's input normalisation as (matrix (3, 3), offset (3,)) on 0-255 RGB.

    Found by probing ``sm.get_preprocessing(backbone)`` with black and pure-channel
    pixels; checked on a random pixel so a non-affine preprocessing cannot slip through.
    """
    fn = sm.get_preprocessing(backbone)

    def probe(pixel: np.ndarray) -> np.ndarray:
        return np.asarray(fn(pixel.reshape(1, 1, 1, 3).astype(np.float32).copy())).reshape(3)

    offset = probe(np.zeros(3))
    matrix = np.stack([(probe(255.0 * np.eye(3)[c]) - offset) / 255.0 for c in range(3)])
    check = np.array([17.0, 133.0, 241.0])
    if not np.allclose(probe(check), check @ matrix + offset, atol=1e-3):
        raise ValueError(f"preprocessing of backbone {backbone!r} is not affine in the channels")
    return matrix, offset


# The ImageNet statistics of RGB in [0, 1] ("torch" preprocessing).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def set_imagenet_statistics(encoder: keras.Model) -> int:
    """Give the encoder's in-model Normalization layers the ImageNet statistics; their count.

    Keras 3's EfficientNet (B0-B7, which segmodels-keras uses) normalises inside the
    encoder, ``Rescaling(1/255)`` then a ``Normalization`` whose mean and variance arrive
    with its ImageNet weights. Built without them (``encoder_weights: null`` or a local
    file) that layer is the identity and the encoder sees [0, 1] pixels, where
    segmentation-models' EfficientNet on tf_keras sees ImageNet-standardised ones. Setting
    mean and variance = std ** 2 gives ``(x / 255 - mean) / std``: the same inputs as
    tf_keras, and what ImageNet weights expect (Keras' own files store the standard
    deviation as the variance and rescale after the layer). Call it after a local file
    is loaded, since such a file may carry that layer's statistics. tf_keras' encoders
    normalise outside the model (``ChannelAffine``): nothing to do there.
    """
    if not KERAS3:
        return 0
    layers = [
        layer
        for layer in all_layers(encoder)
        if isinstance(layer, keras.layers.Normalization) and hasattr(layer, "adapt_mean")
    ]
    for layer in layers:
        if tuple(layer.adapt_mean.shape) != (3,):
            raise ValueError(f"encoder layer {layer.name} does not normalise 3 channels")
        layer.adapt_mean.assign(np.asarray(IMAGENET_MEAN, np.float32))
        layer.adapt_variance.assign(np.square(np.asarray(IMAGENET_STD, np.float32)))
        layer.finalize_state()
    return len(layers)


def resolve_encoder_weights(
    encoder_weights: str | None, key: str = "model.encoder_weights"
) -> tuple[str | None, Path | None]:
    """Split the config value ``key`` into (weights for Keras, local file or None)."""
    if encoder_weights is None or encoder_weights == "imagenet":
        return encoder_weights, None
    path = Path(encoder_weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key} must be 'imagenet', null or an existing weights file; no file at {path}"
        )
    return None, path


def build_segmentation_model(
    architecture: str,
    backbone: str,
    n_classes: int,
    encoder_weights: str | None = None,
    input_size: Sequence[int] | None = None,
    encoder_freeze: bool = False,
    decoder_block_type: str = "upsampling",
    bn_momentum: float | None = None,
    decoder_filters: Sequence[int] | None = None,
    classification_head: bool = False,
    activation: str = "sigmoid",
) -> keras.Model:
    """A sigmoid segmentation model: (N, H, W, 3) 0-255 RGB -> (N, H, W, n_classes) float32.

    ``activation: softmax``: the network scores n_classes + 1 channels (0 = background)
    under a softmax (layer ``BACKGROUND_SOFTMAX``), and the output keeps the n_classes
    foreground probabilities (the background is ``1 - sum``; ``core.exclusive``), so
    every later stage handles it as it does a sigmoid model's.

    ``input_size`` [H, W] fixes the input shape (required by PSPNet); None builds a fully
    convolutional model for any size divisible by 32. ``bn_momentum`` overrides the
    moving-average momentum of every BatchNormalization layer. ``decoder_filters``: the
    five decoder widths of a Unet or Linknet (None = segmentation-models' defaults); a
    narrow decoder is most of the speed-up on CPU at small inputs.
    ``classification_head``: a second output, ``presence`` (N, n_classes) float32, a
    sigmoid over a dense layer on the global average of the encoder's deepest features
    (the input of the first decoder layer); the masks stay the first output, ``prob``.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"model.architecture must be one of {list(ARCHITECTURES)}; got {architecture!r}"
        )
    if backbone not in sm.Backbones.models_names():
        raise ValueError(
            f"model.backbone must be one of {sm.Backbones.models_names()}; got {backbone!r}"
        )
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1; got {n_classes}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"model.activation must be one of {ACTIVATIONS}; got {activation!r}")
    softmax = activation == "softmax"
    sm_weights, local_file = resolve_encoder_weights(encoder_weights)
    if architecture == "PSPNet":
        if input_size is None:
            raise ValueError("PSPNet needs a fixed input size (train.crop_size)")
        check_input_size(input_size, "PSPNet input", PSP_STRIDE)
    elif input_size is not None:
        check_input_size(input_size, f"{architecture} input")
    shape = (*input_size, 3) if input_size is not None else (None, None, 3)
    kwargs: dict[str, Any] = {
        "input_shape": shape,
        "classes": n_classes + 1 if softmax else n_classes,
        "activation": "linear",
        "encoder_weights": sm_weights,
        "encoder_freeze": encoder_freeze,
    }
    if architecture == "Unet":
        if decoder_block_type not in DECODER_BLOCK_TYPES:
            raise ValueError(
                f"model.decoder_block_type must be one of {list(DECODER_BLOCK_TYPES)}; "
                f"got {decoder_block_type!r}"
            )
        kwargs["decoder_block_type"] = decoder_block_type
    if decoder_filters is not None:
        if architecture not in ("Unet", "Linknet"):
            raise ValueError(
                f"model.decoder_filters applies to Unet and Linknet only; got {architecture}"
            )
        if len(decoder_filters) != 5 or min(decoder_filters) < 1:
            raise ValueError(
                f"model.decoder_filters must be 5 positive integers; got {list(decoder_filters)}"
            )
        kwargs["decoder_filters"] = tuple(int(f) for f in decoder_filters)
    net = getattr(sm, architecture)(backbone, **kwargs)
    if local_file is not None:
        # by_name maps the encoder's layers, whose names the backbone file shares.
        load_weights_by_name(net, local_file)
        log.info("encoder weights loaded by layer name from %s", local_file)
    if sm_weights != "imagenet":
        set_imagenet_statistics(net)
    if bn_momentum is not None:
        set_bn_momentum(net, bn_momentum)
    matrix, offset = preprocessing_affine(backbone)
    inputs = keras.Input(shape=shape, name="image")
    x = ChannelAffine(matrix.tolist(), offset.tolist(), name="normalise")(inputs)
    name = f"{architecture}_{backbone}"
    if not classification_head:
        # The sigmoid runs in float32 even under mixed precision, for stable probabilities.
        outputs = _mask_output(net(x), softmax)
        return keras.Model(inputs, outputs, name=name)
    # The same layers with the encoder's deepest features as a second output.
    trunk = keras.Model(net.input, [net.output, encoder_features(net)], name=net.name)
    logits, features = trunk(x)
    masks = _mask_output(logits, softmax)
    pooled = keras.layers.GlobalAveragePooling2D(name="presence_pool")(features)
    scores = keras.layers.Dense(n_classes, name="presence_logits")(pooled)
    presence = keras.layers.Activation("sigmoid", dtype="float32", name=PRESENCE_OUTPUT)(scores)
    return keras.Model(inputs, [masks, presence], name=name)


@keras.utils.register_keras_serializable(package="foldseg")
class Foreground(keras.layers.Layer):
    """Channels 1.. of its input: a softmax's class probabilities without the background."""

    def call(self, inputs: Any) -> Any:
        return inputs[..., 1:]

    def compute_output_shape(self, input_shape: Any) -> Any:
        shape = tuple(input_shape)
        return (*shape[:-1], None if shape[-1] is None else shape[-1] - 1)


def _mask_output(logits: Any, softmax: bool) -> Any:
    """The ``prob`` output of the head's logits, float32: a sigmoid per channel, or the
    foreground channels of a softmax over them (``Foreground``)."""
    if not softmax:
        return keras.layers.Activation("sigmoid", dtype="float32", name=MASK_OUTPUT)(logits)
    probs = keras.layers.Softmax(dtype="float32", name=BACKGROUND_SOFTMAX)(logits)
    return Foreground(dtype="float32", name=MASK_OUTPUT)(probs)


def is_softmax(model: keras.Model) -> bool:
    """True for a model built with ``activation: softmax`` (mutually exclusive classes)."""
    return any(layer.name == BACKGROUND_SOFTMAX for layer in model.layers)


def encoder_features(net: keras.Model) -> Any:
    """The encoder's deepest feature tensor of a segmentation-models network: the input of
    its first decoder layer (stride 32; PSPNet's decoder starts at stride 8)."""
    first = next(layer for layer in net.layers if layer.name.startswith(DECODER_PREFIXES))
    return first.input


def has_presence_head(model: keras.Model) -> bool:
    """True for a model built with ``classification_head``: (masks, presence) outputs."""
    return PRESENCE_OUTPUT in model.output_names


def build_model(config: Config, n_classes: int, input_size: Sequence[int] | None = None) -> Any:
    """The segmentation model of ``config.model`` (call inside the strategy scope)."""
    m = config.model
    return build_segmentation_model(
        m.architecture,
        m.backbone,
        n_classes,
        encoder_weights=m.encoder_weights,
        input_size=input_size,
        decoder_block_type=m.decoder_block_type,
        bn_momentum=m.bn_momentum,
        decoder_filters=m.decoder_filters,
        classification_head=bool(m.classification_head),
        activation=str(m.activation),
    )


def set_bn_momentum(model: keras.Model, momentum: float) -> None:
    """Set the moving-average momentum of every BatchNormalization layer (before compile)."""
    if not 0 <= momentum < 1:
        raise ValueError(f"model.bn_momentum must be in [0, 1); got {momentum}")
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def encoder_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The encoder (backbone) layers of a model from ``build_segmentation_model``."""
    net = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    names = set(_backbone_layer_names(net))
    return [layer for layer in net.layers if layer.name in names]


def _backbone_layer_names(net: keras.Model) -> list[str]:
    # Every layer segmentation-models adds on top of the backbone carries one of the
    # decoder prefixes of its four architectures; the head is the "linear" activation.
    return [
        layer.name
        for layer in net.layers
        if not layer.name.startswith(DECODER_PREFIXES)
        and layer.name != "linear"
        and not isinstance(layer, keras.layers.InputLayer)
    ]


def set_encoder_trainable(model: keras.Model, trainable: bool) -> None:
    """Freeze or unfreeze the whole encoder (recompile with a fresh optimizer after)."""
    set_encoder_fraction(model, 1.0 if trainable else 0.0)


def set_encoder_fraction(model: keras.Model, fraction: float) -> int:
    """Let only the top ``fraction`` of the encoder's layers train (the deepest ones).

    Progressive unfreezing goes from the top block down, since the deepest features are
    the most task-specific. Frozen BatchNorm layers run in inference mode. Returns the
    number of encoder layers left trainable. Recompile with a fresh optimizer after.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}")
    layers = encoder_layers(model)
    n_trainable = math.ceil(fraction * len(layers))
    for i, layer in enumerate(layers):
        layer.trainable = i >= len(layers) - n_trainable
    return n_trainable
