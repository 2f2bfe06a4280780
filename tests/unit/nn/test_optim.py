"""The proof that AccumAdam's N accumulated steps equal one Adam step on the N-fold batch.

Every comparison trains through ``model.fit`` from the same fixed initial weights: a
small tanh MLP (no batch normalisation, so the batch size does not change the forward
pass) with a mean-reduced loss, so the mean of N micro-batch gradients is exactly the
big-batch gradient up to float32 rounding.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.nn import optim
from pipeline.nn.keras_backend import KERAS3, get_value, keras, set_value, tf

REPO = Path(__file__).resolve().parents[3]
LR = 0.01
STEPS = 4  # accumulation_steps in the proof
MICRO_BATCH = 5
RTOL, ATOL = 1e-5, 1e-6

_rng = np.random.default_rng(12345)
# Enough for two accumulation cycles of two replicas.
X = _rng.normal(size=(4 * STEPS * MICRO_BATCH, 6)).astype(np.float32)
Y = _rng.normal(size=(4 * STEPS * MICRO_BATCH, 3)).astype(np.float32)
INITIAL_WEIGHTS = [
    _rng.normal(scale=0.5, size=shape).astype(np.float32) for shape in [(6, 8), (8,), (8, 3), (3,)]
]


def make_model() -> keras.Model:
    """A (None, 6) -> (None, 3) tanh MLP set to INITIAL_WEIGHTS."""
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    model.set_weights(INITIAL_WEIGHTS)
    return model


def fit(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    batch_size: int,
    steps: int,
    start: int = 0,
) -> list[np.ndarray]:
    """Fit ``steps`` batches of ``batch_size`` from sample ``start`` on, in order.

    The model is compiled with ``optimizer`` on its first fit only, as in a real run.
    """
    if getattr(model, "optimizer", None) is None:
        model.compile(optimizer=optimizer, loss="mse")
    data = tf.data.Dataset.from_tensor_slices((X[start:], Y[start:])).batch(batch_size)
    model.fit(data, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    return model.get_weights()


def max_abs_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def assert_weights_close(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL)


def compare_accumulated_with_big_batch(cycles: int, epsilon: float = 1e-7) -> tuple[list, list]:
    """Weights after ``cycles`` accumulated Adam steps and after as many big-batch steps."""
    accumulated = fit(
        make_model(),
        optim.make_optimizer(LR, STEPS, epsilon=epsilon),
        MICRO_BATCH,
        STEPS * cycles,
    )
    big_batch = fit(
        make_model(), keras.optimizers.Adam(LR, epsilon=epsilon), STEPS * MICRO_BATCH, cycles
    )
    return accumulated, big_batch


# Adam barely notices a gradient's scale unless epsilon is large: epsilon 0.1 makes the
# proof tell the mean of the micro-batch gradients from their sum.
@pytest.mark.parametrize(("cycles", "epsilon"), [(1, 1e-7), (2, 1e-7), (2, 0.1)])
def test_accumulated_steps_equal_big_batch_steps(cycles: int, epsilon: float) -> None:
    accumulated, big_batch = compare_accumulated_with_big_batch(cycles, epsilon)
    assert max_abs_difference(big_batch, INITIAL_WEIGHTS) > 100 * ATOL  # training moved
    assert_weights_close(accumulated, big_batch)


def test_xla_update_path_equals_big_batch_steps() -> None:
    # On a GPU tf_keras compiles each variable's update with XLA (jit_compile), a path
    # the CPU default skips; force it on both optimizers to cover it here.
    accumulating, reference = optim.make_optimizer(LR, STEPS), keras.optimizers.Adam(LR)
    accumulating.jit_compile = reference.jit_compile = True
    accumulated = fit(make_model(), accumulating, MICRO_BATCH, 2 * STEPS)
    big_batch = fit(make_model(), reference, STEPS * MICRO_BATCH, 2)
    assert int(accumulating.iterations) == 2
    assert_weights_close(accumulated, big_batch)


def test_one_accumulation_step_is_plain_adam() -> None:
    accumulating = fit(make_model(), optim.make_optimizer(LR, 1), MICRO_BATCH, 6)
    plain = fit(make_model(), keras.optimizers.Adam(LR), MICRO_BATCH, 6)
    assert_weights_close(accumulating, plain)
    assert max_abs_difference(accumulating, plain) < 1e-7


def test_weights_and_adam_state_frozen_until_last_micro_step() -> None:
    model, optimizer = make_model(), optim.make_optimizer(LR, STEPS)
    after_partial = fit(model, optimizer, MICRO_BATCH, STEPS - 1)
    assert max_abs_difference(after_partial, INITIAL_WEIGHTS) == 0.0
    assert int(optimizer.iterations) == 0
    assert int(optimizer.micro_step) == STEPS - 1
    after_full = fit(model, optimizer, MICRO_BATCH, 1, start=(STEPS - 1) * MICRO_BATCH)
    assert max_abs_difference(after_full, INITIAL_WEIGHTS) > 100 * ATOL
    assert int(optimizer.iterations) == 1
    assert int(optimizer.micro_step) == 0


def test_checkpoint_mid_accumulation_resumes_exactly(tmp_path: Path) -> None:
    uninterrupted = fit(make_model(), optim.make_optimizer(LR, STEPS), MICRO_BATCH, 2 * STEPS)

    model, optimizer = make_model(), optim.make_optimizer(LR, STEPS)
    fit(model, optimizer, MICRO_BATCH, 2)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(tmp_path / "ckpt"))

    fresh_model, fresh_optimizer = make_model(), optim.make_optimizer(LR, STEPS)
    fresh_model.set_weights([np.zeros_like(w) for w in INITIAL_WEIGHTS])
    status = tf.train.Checkpoint(model=fresh_model, optimizer=fresh_optimizer).read(path)
    status.assert_existing_objects_matched()
    assert int(fresh_optimizer.micro_step) == 2
    resumed = fit(fresh_model, fresh_optimizer, MICRO_BATCH, 2 * STEPS - 2, start=2 * MICRO_BATCH)
    status.assert_consumed()  # accumulators and moments were restored when built
    assert_weights_close(resumed, uninterrupted)


def test_learning_rate_is_settable_like_reduce_lr_on_plateau() -> None:
    model, optimizer = make_model(), optim.make_optimizer(LR, 2)
    fit(model, optimizer, MICRO_BATCH, 2)
    set_value(optimizer.learning_rate, 0.0)
    assert get_value(optimizer.learning_rate) == 0.0
    before = model.get_weights()
    after = fit(model, optimizer, MICRO_BATCH, 2, start=2 * MICRO_BATCH)
    assert max_abs_difference(after, before) == 0.0  # the traced step reads the variable
    optimizer.learning_rate = 0.5
    assert get_value(optimizer.learning_rate) == 0.5


def test_accumulation_under_mixed_precision_loss_scaling() -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, optimizer = make_model(), optim.make_optimizer(LR, STEPS)
        after_partial = fit(model, optimizer, MICRO_BATCH, STEPS - 1)
        assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
        assert max_abs_difference(after_partial, INITIAL_WEIGHTS) == 0.0
        after_full = fit(model, optimizer, MICRO_BATCH, 1, start=(STEPS - 1) * MICRO_BATCH)
        assert max_abs_difference(after_full, INITIAL_WEIGHTS) > 100 * ATOL
        assert int(optimizer.iterations) == 1
    finally:
        keras.mixed_precision.set_global_policy("float32")


# Epsilon 0.1 makes Adam's step depend on the gradient's scale, so a loss scale that
# were not undone before accumulating (or undone twice) would show.
@pytest.mark.parametrize("scale", [2.0**12, 2.0**-3])
def test_loss_scaled_accumulated_update_equals_the_unscaled_one(scale: float) -> None:
    if KERAS3:  # a fixed scale is the optimizer's own loss_scale_factor in Keras 3
        scaled = optim.make_optimizer(LR, STEPS, epsilon=0.1, loss_scale_factor=scale)
    else:
        scaled = keras.mixed_precision.LossScaleOptimizer(
            optim.make_optimizer(LR, STEPS, epsilon=0.1), dynamic=False, initial_scale=scale
        )
    accumulated = fit(make_model(), scaled, MICRO_BATCH, 2 * STEPS)
    unscaled = fit(make_model(), optim.make_optimizer(LR, STEPS, epsilon=0.1), MICRO_BATCH, 8)
    big_batch = fit(make_model(), keras.optimizers.Adam(LR, epsilon=0.1), STEPS * MICRO_BATCH, 2)
    assert max_abs_difference(big_batch, INITIAL_WEIGHTS) > 100 * ATOL
    assert_weights_close(accumulated, unscaled)
    assert_weights_close(accumulated, big_batch)


def test_mixed_float16_dynamic_loss_scale_accumulation_matches_float32_big_batch() -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_model()
        mixed = fit(model, optim.make_optimizer(LR, STEPS, epsilon=0.1), MICRO_BATCH, 2 * STEPS)
        assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
        assert KERAS3 or model.optimizer.dynamic  # Keras 3's is always dynamic
        assert int(model.optimizer.inner_optimizer.iterations) == 2
    finally:
        keras.mixed_precision.set_global_policy("float32")
    big_batch = fit(make_model(), keras.optimizers.Adam(LR, epsilon=0.1), STEPS * MICRO_BATCH, 2)
    moved = max_abs_difference(big_batch, INITIAL_WEIGHTS)
    # float16 activations: the same update up to half-precision rounding (2**-11).
    assert max_abs_difference(mixed, big_batch) < 0.02 * moved


def test_config_round_trip_keeps_accumulation_steps() -> None:
    optimizer = optim.make_optimizer(0.003, 8, beta_2=0.99)
    config = json.loads(json.dumps(keras.optimizers.serialize(optimizer), default=float))
    restored = keras.optimizers.deserialize(config)
    assert isinstance(restored, optim.AccumAdam)
    assert restored.get_config()["accumulation_steps"] == 8
    assert restored.get_config()["beta_2"] == 0.99
    assert restored.get_config()["learning_rate"] == pytest.approx(0.003)


@pytest.mark.parametrize("steps", [0, -2, 2.0, True])
def test_make_optimizer_rejects_bad_accumulation_steps(steps: object) -> None:
    with pytest.raises(ValueError, match="accumulation_steps must be an integer >= 1; got"):
        optim.make_optimizer(0.001, steps)  # type: ignore[arg-type]


def test_make_optimizer_rejects_bad_lr_and_per_micro_batch_options() -> None:
    with pytest.raises(ValueError, match=r"lr must be > 0; got 0\.0"):
        optim.make_optimizer(0.0, 4)
    with pytest.raises(ValueError, match="clipnorm is not supported with accumulation_steps > 1"):
        optim.make_optimizer(0.001, 4, clipnorm=1.0)
    assert optim.make_optimizer(0.001, 1, clipnorm=1.0).clipnorm == 1.0


@pytest.mark.parametrize("steps", [1, STEPS])
def test_accumulated_weight_decay_equals_keras_adamw_on_the_big_batch(steps: int) -> None:
    accumulated = fit(
        make_model(), optim.make_optimizer(LR, steps, weight_decay=0.5), MICRO_BATCH, steps * 3
    )
    reference = fit(
        make_model(), keras.optimizers.AdamW(LR, weight_decay=0.5), steps * MICRO_BATCH, 3
    )
    plain = fit(make_model(), keras.optimizers.Adam(LR), steps * MICRO_BATCH, 3)
    assert_weights_close(accumulated, reference)
    assert max_abs_difference(reference, plain) > 100 * ATOL  # the decay acted


def test_scaled_learning_rate_moves_only_those_variables_slower() -> None:
    factor = 0.1
    scaled_model, optimizer = make_model(), optim.make_optimizer(LR, STEPS, weight_decay=0.5)
    optimizer.scale_lr(scaled_model.layers[0].trainable_weights, factor)
    scaled = fit(scaled_model, optimizer, MICRO_BATCH, STEPS)
    full = fit(make_model(), optim.make_optimizer(LR, STEPS, weight_decay=0.5), MICRO_BATCH, STEPS)
    # One Adam step moves each weight by lr * m_hat / (sqrt(v_hat) + eps) (+ decay, also
    # scaled): the first layer's move is factor times the unscaled one, the rest equal
    # (atol: float32 spacing at weights near 1 is 1.2e-7).
    for i in (0, 1):
        np.testing.assert_allclose(
            scaled[i] - INITIAL_WEIGHTS[i],
            factor * (full[i] - INITIAL_WEIGHTS[i]),
            rtol=1e-4,
            atol=2e-7,
        )
    for i in (2, 3):
        np.testing.assert_allclose(scaled[i], full[i], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="factor must be > 0"):
        optimizer.scale_lr([], 0.0)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json
    from pipeline.nn.keras_backend import keras, tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pipeline.nn import optim
    from tests.unit.nn import test_optim as t

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model, optimizer = t.make_model(), optim.make_optimizer(t.LR, t.STEPS)
        # Global batch 2 * MICRO_BATCH: each replica gets MICRO_BATCH samples.
        mirrored = t.fit(model, optimizer, 2 * t.MICRO_BATCH, 2 * t.STEPS)
    big_batch = t.fit(t.make_model(), keras.optimizers.Adam(t.LR), 2 * t.STEPS * t.MICRO_BATCH, 2)
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "iterations": int(optimizer.iterations.numpy()),
        "max_abs_diff": t.max_abs_difference(mirrored, big_batch),
        "moved": t.max_abs_difference(big_batch, t.INITIAL_WEIGHTS),
    }))
    """
)


@pytest.mark.slow
def test_mirrored_accumulation_equals_single_device_big_batch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert report["iterations"] == 2
    assert report["moved"] > 100 * ATOL
    assert report["max_abs_diff"] < ATOL + RTOL * 1.0
