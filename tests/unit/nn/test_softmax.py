"""model.activation softmax in the Keras layer: the model's C foreground channels, the
cross-entropy + Dice loss against numpy with void pixels left out, the argmax metrics,
and the void channel of the training targets."""

from __future__ import annotations

import numpy as np

from pipeline.core.exclusive import argmax_masks, one_hot, without_void
from pipeline.core.metrics import kaggle_dice
from pipeline.nn import losses
from pipeline.nn import metrics as nn_metrics
from pipeline.nn.data import with_void_channel
from pipeline.nn.keras_backend import keras
from pipeline.nn.model import BACKGROUND_SOFTMAX, build_segmentation_model, is_softmax
from pipeline.run.image_cache import ImageCache


def exclusive_batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target (2, 8, 8, C+1) with the void channel last, foreground probs (2, 8, 8, C),
    void (2, 8, 8)) for C = 3."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 4, size=(2, 8, 8))
    void = (rng.random((2, 8, 8)) < 0.25).astype(np.uint8)
    truth = without_void(one_hot(label, 3), void)
    target = np.concatenate([truth, void[..., None]], axis=-1).astype(np.float32)
    probs = rng.dirichlet(np.ones(4), size=(2, 8, 8))[..., 1:].astype(np.float32)
    return target, probs, void


def numpy_loss(target: np.ndarray, probs: np.ndarray) -> float:
    valid = 1.0 - target[..., -1:]
    truth = target[..., :-1]
    t = np.concatenate([1.0 - truth.sum(-1, keepdims=True), truth], -1) * valid
    p = np.concatenate([1.0 - probs.sum(-1, keepdims=True), probs], -1) * valid
    ce = -(t * np.log(np.clip(p, 1e-7, 1.0))).sum() / valid.sum()
    inter = (t[..., 1:] * p[..., 1:]).sum(axis=(0, 1, 2))
    total = (t[..., 1:] + p[..., 1:]).sum(axis=(0, 1, 2))
    dice = ((2 * inter + 1e-5) / (total + 1e-5)).mean()
    return float(ce + 1.0 - dice)


def test_softmax_model_outputs_foreground_probabilities() -> None:
    model = build_segmentation_model("Unet", "resnet18", 3, activation="softmax")
    assert is_softmax(model)
    assert not is_softmax(build_segmentation_model("Unet", "resnet18", 3))
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    probs = np.asarray(model.predict_on_batch(images))
    assert probs.shape == (2, 32, 32, 3) and probs.dtype == np.float32
    # C of the C+1 softmax channels: channel 0 (the background) is left out. An untrained
    # network's softmax may be saturated anywhere, so compare with the whole softmax.
    full = keras.Model(model.input, model.get_layer(BACKGROUND_SOFTMAX).output)
    whole = np.asarray(full.predict_on_batch(images))
    assert whole.shape == (2, 32, 32, 4)
    np.testing.assert_allclose(whole.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs, whole[..., 1:])


def test_loss_matches_numpy_and_ignores_void_pixels() -> None:
    target, probs, void = exclusive_batch(1)
    loss = losses.ExclusiveCeDiceLoss()
    value = float(loss(target, probs))
    np.testing.assert_allclose(value, numpy_loss(target, probs), rtol=1e-4)
    # Anything predicted at void pixels leaves the loss as it was.
    rewritten = np.where(void[..., None] == 1, np.float32([0.97, 0.01, 0.01]), probs)
    np.testing.assert_allclose(float(loss(target, rewritten)), value, rtol=1e-5)
    # But the same rewrite at labelled pixels does change it (the check can fail).
    elsewhere = np.where(void[..., None] == 0, np.float32([0.97, 0.01, 0.01]), probs)
    assert abs(float(loss(target, elsewhere)) - value) > 1e-3
    # Every pixel void: no loss, not NaN.
    all_void = target.copy()
    all_void[..., :-1], all_void[..., -1] = 0, 1
    assert float(loss(all_void, probs)) == 0.0


def test_argmax_metric_equals_the_numpy_kaggle_dice_without_void() -> None:
    target, probs, void = exclusive_batch(2)
    metric = nn_metrics.KaggleDice(exclusive=True)
    metric.update_state(target, probs)
    truth = target[..., :-1].astype(np.uint8)
    expected = kaggle_dice(truth, without_void(argmax_masks(probs), void), 0.5).mean()
    np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-6)
    compiled = losses.segmentation_compile_args(
        build_segmentation_model("Unet", "resnet18", 3, activation="softmax"), "jaccard", 0.5, 0
    )
    assert isinstance(compiled["loss"], losses.ExclusiveCeDiceLoss)
    assert all(getattr(m, "exclusive", False) for m in compiled["metrics"])
    assert keras.metrics.deserialize(keras.metrics.serialize(metric)).exclusive


def test_training_target_gains_the_void_channel(tmp_path) -> None:
    masks = np.zeros((1, 4, 4, 2), np.uint8)
    masks[0, 0, 0, 1] = 1
    void = np.zeros((1, 4, 4), np.uint8)
    void[0, 3, 3] = 1
    cache = ImageCache(
        tmp_path, ["a"], np.array([[4, 4]]), np.zeros((1, 4, 4, 3), np.uint8), masks, void
    )
    target = with_void_channel(cache, 0, masks[0])
    assert target.shape == (4, 4, 3) and target[0, 0, 1] == 1 and target[3, 3, 2] == 1
    plain = ImageCache(tmp_path, ["a"], np.array([[4, 4]]), np.zeros((1, 4, 4, 3), np.uint8), masks)
    assert with_void_channel(plain, 0, masks[0])[..., 2].sum() == 0
