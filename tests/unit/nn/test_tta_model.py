"""TTA through a real Keras model: rotations of non-square images run at the swapped shape."""

from __future__ import annotations

import numpy as np

from pipeline.nn.inference import accepts_swapped, predict_tta
from pipeline.nn.keras_backend import keras


def _conv_net(shape: tuple) -> keras.Model:
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.UpSampling2D()(x)
    outputs = keras.layers.Conv2D(2, 3, padding="same", activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def test_rotated_views_of_a_rectangle_equal_the_model_run_on_rotated_images() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 64, 3), dtype=np.uint8)
    model = _conv_net((None, None, 3))
    views = ["identity", "hflip", "rot90", "transpose"]
    got = predict_tta(model, images, views)
    x = images.astype(np.float32)
    plain = model.predict_on_batch(x)
    flipped = model.predict_on_batch(x[:, :, ::-1])[:, :, ::-1]
    turned = np.rot90(model.predict_on_batch(np.rot90(x, 1, axes=(1, 2))), -1, axes=(1, 2))
    transposed = model.predict_on_batch(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    expected = (plain + flipped + turned + transposed) / 4
    assert got.shape == (3, 32, 64, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # A network that is not rotation-equivariant: the rotated views really differ.
    assert np.abs(turned - plain).max() > 1e-3


def test_a_fixed_shape_model_drops_the_rotations_of_rectangles() -> None:
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)
    fixed = _conv_net((32, 64, 3))
    assert not accepts_swapped(fixed, 32, 64)
    assert accepts_swapped(fixed, 32, 32) is False  # 32x64 takes neither 32x32 nor 64x32
    assert accepts_swapped(_conv_net((None, None, 3)), 32, 64)
    assert accepts_swapped(_conv_net((32, 32, 3)), 32, 32)
    got = predict_tta(fixed, images, ["identity", "rot90", "rot270"])
    np.testing.assert_allclose(got, fixed.predict_on_batch(images.astype(np.float32)), rtol=1e-6)
