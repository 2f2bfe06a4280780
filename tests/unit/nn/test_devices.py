"""Strategy choice: auto is the plain default strategy on one device."""

import pytest

from pipeline.nn.devices import make_strategy
from pipeline.nn.keras_backend import KERAS3, tf


def test_auto_without_gpus_is_the_default_strategy_not_a_wrapper():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a GPU is visible")
    strategy = make_strategy("auto")
    assert strategy is tf.distribute.get_strategy()
    assert strategy.num_replicas_in_sync == 1
    assert isinstance(make_strategy("one_device"), tf.distribute.OneDeviceStrategy)


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"train.strategy must be one of \['auto'"):
        make_strategy("tpu")


def test_a_model_built_under_a_bfloat16_policy_predicts_float32_close_to_float32() -> None:
    import numpy as np

    from pipeline.nn.devices import precision_policy
    from pipeline.nn.keras_backend import keras

    def build() -> keras.Model:
        # The shape of the pipeline's models: float32 weights, a float32 sigmoid head.
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
        x = keras.layers.Conv2D(2, 1)(x)
        return keras.Model(inputs, keras.layers.Activation("sigmoid", dtype="float32")(x))

    reference = build()
    with precision_policy("bfloat16"):
        fast = build()
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    assert fast.layers[1].compute_dtype == "bfloat16"
    fast.set_weights(reference.get_weights())
    assert all(w.dtype == "float32" for w in fast.weights)  # weights stay float32
    images = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    want, got = reference.predict_on_batch(images), fast.predict_on_batch(images)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert 0 < np.abs(got - want).max() < 0.02  # bfloat16 arithmetic, close to float32


@pytest.mark.skipif(not KERAS3, reason="the Keras 3 layer's limit")
def test_keras3_refuses_multi_worker_with_a_clear_error():
    with pytest.raises(ValueError, match="train.strategy 'multi_worker' needs framework tf_keras"):
        make_strategy("multi_worker")


def test_bfloat16_training_policy_trains_float32_weights_with_the_accumulating_adam() -> None:
    """train.mixed_precision: bfloat16 computes in bfloat16 on any device, keeps float32
    weights and needs no loss scaling; two accumulated micro-steps apply one update."""
    import numpy as np

    from pipeline.nn.devices import set_mixed_precision
    from pipeline.nn.keras_backend import keras
    from pipeline.nn.optim import make_optimizer

    try:
        assert set_mixed_precision("bfloat16") == "mixed_bfloat16"
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
        x = keras.layers.Conv2D(1, 1)(x)
        model = keras.Model(inputs, keras.layers.Activation("sigmoid", dtype="float32")(x))
        assert model.layers[1].compute_dtype == "bfloat16"
        assert all(w.dtype == "float32" for w in model.trainable_weights)
        model.compile(make_optimizer(1e-2, 2), loss="binary_crossentropy")
        assert not isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
        rng = np.random.default_rng(0)
        images = rng.random((4, 8, 8, 3)).astype("float32")
        masks = (rng.random((4, 8, 8, 1)) > 0.5).astype("float32")
        before = [w.numpy().copy() for w in model.trainable_weights]
        history = model.fit(images, masks, batch_size=2, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        after = [w.numpy() for w in model.trainable_weights]
        assert any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))
    finally:
        assert set_mixed_precision(False) is None
    assert keras.mixed_precision.global_policy().name == "float32"
    if not tf.config.list_physical_devices("GPU"):
        assert set_mixed_precision(True) is None  # float16 has no fast path on a CPU
