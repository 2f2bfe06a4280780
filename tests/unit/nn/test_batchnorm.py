"""Precise BatchNorm: moving statistics re-estimated as the plain mean over batches."""

import numpy as np

from pipeline.nn.batchnorm import batchnorm_layers, recalibrate, recalibrate_copy
from pipeline.nn.keras_backend import KERAS3, keras


def tiny_model() -> keras.Model:
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.BatchNormalization(momentum=0.99, name="bn0")(inputs)
    x = keras.layers.Conv2D(2, 1, name="conv")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(x)
    return keras.Model(inputs, x)


def batches(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(loc=k, scale=1 + k, size=(5, 4, 4, 3)).astype(np.float32) for k in range(3)]


def test_moving_mean_becomes_the_mean_of_batch_means_and_momentum_is_restored():
    model = tiny_model()
    data = batches()
    assert recalibrate(model, data) == 3
    bn0 = model.get_layer("bn0")
    expected_mean = np.mean([b.mean(axis=(0, 1, 2)) for b in data], axis=0)
    # tf_keras keeps the unbiased (ddof 1) batch variance in the moving average, Keras 3
    # the biased one (ddof 0).
    ddof = 0 if KERAS3 else 1
    expected_var = np.mean([b.reshape(-1, 3).var(axis=0, ddof=ddof) for b in data], axis=0)
    np.testing.assert_allclose(bn0.moving_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn0.moving_variance.numpy(), expected_var, rtol=1e-4, atol=1e-5)
    assert sorted(layer.momentum for layer in batchnorm_layers(model)) == [0.9, 0.99]


def test_recalibrating_twice_gives_the_same_statistics_and_leaves_other_weights():
    model = tiny_model()
    kernel = model.get_layer("conv").kernel.numpy().copy()
    recalibrate(model, batches())
    first = [w.copy() for w in model.get_weights()]
    recalibrate(model, batches())
    for a, b in zip(first, model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model.get_layer("conv").kernel.numpy(), kernel)


def test_the_copy_path_matches_in_place_and_keeps_frozen_layers():
    direct, copied = tiny_model(), tiny_model()
    copied.set_weights(direct.get_weights())
    for model in (direct, copied):
        model.get_layer("bn0").trainable = False  # a frozen encoder layer
    frozen_mean = direct.get_layer("bn0").moving_mean.numpy().copy()
    recalibrate(direct, batches())
    recalibrate_copy(copied, tiny_model, batches())
    np.testing.assert_array_equal(copied.get_layer("bn0").moving_mean.numpy(), frozen_mean)
    assert not np.allclose(copied.get_layer("bn1").moving_mean.numpy(), 0.0)
    for model in (direct, copied):
        model.get_layer("bn0").trainable = True
    for a, b in zip(direct.get_weights(), copied.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_no_batches_changes_nothing():
    model = tiny_model()
    before = [w.copy() for w in model.get_weights()]
    assert recalibrate(model, []) == 0
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
