"""Model building from config: architectures, backbones, sizes, weights, freezing."""

import numpy as np
import pytest

from pipeline.nn.classifier import build_classifier
from pipeline.nn.keras_backend import BACKBONE_MODULES, KERAS3, keras, sm
from pipeline.nn.model import (
    ChannelAffine,
    build_segmentation_model,
    check_input_size,
    encoder_layers,
    preprocessing_affine,
    set_encoder_trainable,
)

# ResNet-18's first convolution: segmentation-models' name, and its Keras 3 fork's
# (keras.applications' ResNet naming).
FIRST_CONV = "conv1_conv" if KERAS3 else "conv0"


def test_sizes_not_divisible_by_32_are_rejected_with_nearest_valid_sizes():
    check_input_size([352, 544], "train.crop_size")
    with pytest.raises(ValueError, match=r"got \[350, 544\].*H=350 -> 320 or 352"):
        check_input_size([350, 544], "train.crop_size")
    with pytest.raises(ValueError, match=r"H=20 -> 32 or 32, W=100 -> 96 or 128"):
        check_input_size([20, 100], "x")


def test_build_rejects_bad_input_size_and_names():
    with pytest.raises(ValueError, match="divisible by 32"):
        build_segmentation_model("Unet", "resnet18", 2, input_size=[100, 96])
    with pytest.raises(ValueError, match="model.backbone must be one of"):
        build_segmentation_model("Unet", "resnet19", 2)
    with pytest.raises(ValueError, match="model.architecture must be one of"):
        build_segmentation_model("DeepLab", "resnet18", 2)
    with pytest.raises(FileNotFoundError, match="no file at"):
        build_segmentation_model("Unet", "resnet18", 2, encoder_weights="/no/such/weights.h5")


@pytest.mark.parametrize(
    ("architecture", "backbone", "size"),
    [
        ("Unet", "resnet18", (64, 96)),
        ("FPN", "resnet18", (64, 64)),
        ("Linknet", "mobilenetv2", (64, 96)),
        ("PSPNet", "resnet18", (96, 96)),
    ],
)
def test_architectures_build_and_predict_probabilities(architecture, backbone, size):
    fixed = size if architecture == "PSPNet" else None
    model = build_segmentation_model(architecture, backbone, 3, input_size=fixed)
    x = np.random.default_rng(0).integers(0, 256, (2, *size, 3)).astype(np.float32)
    y = model.predict_on_batch(x)
    assert y.shape == (2, *size, 3)
    assert y.dtype == np.float32 and (y >= 0).all() and (y <= 1).all()


@pytest.mark.slow
def test_default_backbone_builds():
    model = build_segmentation_model("Unet", "efficientnetb2", 4)
    assert model.output_shape == (None, None, None, 4)


@pytest.mark.parametrize("backbone", ["efficientnetb0", "vgg16", "resnet18", "mobilenetv2"])
def test_normalisation_layer_equals_the_backbone_preprocessing(backbone):
    matrix, offset = preprocessing_affine(backbone)
    x = np.random.default_rng(1).integers(0, 256, (2, 5, 7, 3)).astype(np.float32)
    expected = sm.get_preprocessing(backbone)(x.copy())
    got = ChannelAffine(matrix.tolist(), offset.tolist())(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_channel_affine_round_trips_through_config():
    layer = ChannelAffine([[1, 0, 0], [0, 2, 0], [0, 0, 3]], [0.5, 0, -1])
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert clone.matrix == layer.matrix and clone.offset == layer.offset


def test_local_encoder_weights_file_is_loaded_by_layer_name(tmp_path):
    backbone = sm.Backbones.get_backbone(
        "resnet18", input_shape=(None, None, 3), weights=None, include_top=False, **BACKBONE_MODULES
    )
    for w in backbone.weights:
        w.assign(np.full(w.shape, 0.123, dtype=np.float32))
    # Each Keras writes its own format (Keras 3 only under a .weights.h5 name).
    path = tmp_path / ("resnet18_notop" + (".weights.h5" if KERAS3 else ".h5"))
    backbone.save_weights(str(path))
    model = build_segmentation_model("Unet", "resnet18", 1, encoder_weights=str(path))
    net = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    conv = net.get_layer(FIRST_CONV)
    np.testing.assert_allclose(conv.get_weights()[0], 0.123)


def test_encoder_freezing_touches_only_the_encoder():
    model = build_segmentation_model("Unet", "resnet18", 2)
    encoder = {layer.name for layer in encoder_layers(model)}
    assert FIRST_CONV in encoder and "decoder_stage0a_conv" not in encoder
    set_encoder_trainable(model, False)
    net = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    assert not net.get_layer(FIRST_CONV).trainable
    assert net.get_layer("decoder_stage0a_conv").trainable
    set_encoder_trainable(model, True)
    assert net.get_layer(FIRST_CONV).trainable


def test_decoder_filters_narrow_the_decoder():
    wide = build_segmentation_model("Unet", "resnet18", 2)
    narrow = build_segmentation_model("Unet", "resnet18", 2, decoder_filters=[64, 32, 16, 8, 4])
    assert narrow.count_params() < wide.count_params()
    x = np.zeros((1, 64, 64, 3), np.float32)
    assert narrow.predict_on_batch(x).shape == (1, 64, 64, 2)
    linknet = build_segmentation_model("Linknet", "resnet18", 2, decoder_filters=[8] * 5)
    assert linknet.predict_on_batch(x).shape == (1, 64, 64, 2)
    with pytest.raises(ValueError, match="decoder_filters applies to Unet and Linknet only"):
        build_segmentation_model("FPN", "resnet18", 2, decoder_filters=[8] * 5)
    with pytest.raises(ValueError, match="must be 5 positive integers"):
        build_segmentation_model("Unet", "resnet18", 2, decoder_filters=[8] * 4)


def stem_input(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """What the EfficientNet encoder's first convolution receives for 0-255 pixels ``x``."""
    net = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    probe = keras.Model(net.input, net.get_layer("stem_conv").input)
    seen = np.asarray(probe(model.get_layer("normalise")(x)))
    return seen[:, : x.shape[1], : x.shape[2]]  # Keras 3 pads the stem's bottom and right


@pytest.mark.parametrize("local_file", [False, True])
def test_efficientnet_encoder_sees_imagenet_standardised_pixels(tmp_path, local_file):
    # segmentation-models normalises outside the encoder, Keras 3's EfficientNet inside it
    # with statistics that come with its ImageNet weights: without them both frameworks'
    # encoders must still see (x / 255 - mean) / std, as ImageNet weights expect.
    weights = None
    if local_file:
        backbone = sm.Backbones.get_backbone(
            "efficientnetb0", input_shape=(None, None, 3), weights=None, include_top=False,
            **BACKBONE_MODULES,
        )  # fmt: skip
        if KERAS3:  # Keras' own ImageNet files store the std as the variance
            norm = next(w for w in backbone.layers if isinstance(w, keras.layers.Normalization))
            norm.adapt_mean.assign([0.485, 0.456, 0.406])
            norm.adapt_variance.assign([0.229, 0.224, 0.225])
        weights = str(tmp_path / ("b0_notop" + (".weights.h5" if KERAS3 else ".h5")))
        backbone.save_weights(weights)
    model = build_segmentation_model("Unet", "efficientnetb0", 1, encoder_weights=weights)
    classifier = build_classifier("efficientnetb0", 1, (32, 64), weights=weights)
    x = np.random.default_rng(2).integers(0, 256, (1, 32, 64, 3)).astype(np.float32)
    expected = (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    for built in (model, classifier):
        np.testing.assert_allclose(stem_input(built, x), expected, rtol=1e-4, atol=1e-4)
