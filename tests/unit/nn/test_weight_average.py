"""The EMA of weights (train.ema_decay): its arithmetic, when it updates, what it validates
and saves, and that a resumed run continues it exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.layout import BEST_WEIGHTS
from pipeline.nn.callbacks import AverageWeights, WeightAverage
from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.optim import make_optimizer
from tests.unit.nn.test_trainer_stream import (
    LINEAR_INITIAL as INITIAL,
)
from tests.unit.nn.test_trainer_stream import (
    fit_linear,
    linear_model,
)

_rng = np.random.default_rng(7)
X = _rng.normal(size=(16, 3)).astype(np.float32)
Y = (X @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)


def _model() -> keras.Model:
    return linear_model()


def test_update_and_swap_arithmetic() -> None:
    model = _model()
    average = WeightAverage(model, 0.99)
    w1 = [np.full((3, 1), 1.3, np.float32), np.ones((1,), np.float32)]
    model.set_weights(w1)
    average.update()  # n = 1: the decay is min(0.99, 2 / 11)
    d = 2 / 11
    expected = [d * a + (1 - d) * b for a, b in zip(INITIAL, w1, strict=True)]
    for got, want in zip(average.shadow, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    with average.swapped():
        for got, want in zip(model.get_weights(), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
    for got, want in zip(model.get_weights(), w1, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"train.ema_decay must be in \(0, 1\)"):
        WeightAverage(model, 1.0)


def test_the_average_moves_once_per_applied_step_and_validation_sees_it() -> None:
    model = _model()
    model.compile(optimizer=make_optimizer(0.05, 2), loss="mse")
    average = WeightAverage(model, 0.9)
    seen: list[list[np.ndarray]] = []

    class Probe(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            seen.append(self.model.get_weights())

    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(4)
    model.fit(data, epochs=2, validation_data=data, callbacks=[AverageWeights(average), Probe()],
              verbose=0)  # fmt: skip
    # 4 micro-batches per epoch, 2 per Adam step: 2 steps per epoch.
    assert int(model.optimizer.iterations) == 4 and int(average.updates) == 4
    # During validation the model held the average (the callback swapped it in first).
    np.testing.assert_allclose(seen[-1][0], average_after_swap_back(model, average)[0])
    assert not np.allclose(seen[-1][0], model.get_weights()[0])


def average_after_swap_back(model: keras.Model, average: WeightAverage) -> list[np.ndarray]:
    with average.swapped():
        return model.get_weights()


def _fit(out_dir: Path, epochs: int, resume: bool, ema: float | None) -> tuple[keras.Model, dict]:
    return fit_linear(out_dir, X, Y, epochs, resume, 2, ema_decay=ema)


def test_the_best_checkpoint_is_the_validated_average(tmp_path: Path) -> None:
    model, state = _fit(tmp_path, 3, False, 0.9)
    best = min(row["val_loss"] for row in state["history"])
    val = tf.data.Dataset.from_tensor_slices((X, Y)).batch(8)
    # fit_resumable ends with the best weights loaded: they score the logged val_loss.
    assert model.evaluate(val, verbose=0) == pytest.approx(best, rel=1e-5)
    raw, _ = _fit(tmp_path / "plain", 3, False, None)
    assert not np.allclose(raw.get_weights()[0], model.get_weights()[0])


def test_a_resumed_run_continues_the_average_exactly(tmp_path: Path) -> None:
    whole, _ = _fit(tmp_path / "whole", 4, False, 0.9)
    _fit(tmp_path / "split", 2, False, 0.9)
    resumed, state = _fit(tmp_path / "split", 4, True, 0.9)
    assert state["epoch"] == 4 and state["best_epoch"] == 4  # saved after the resume
    for a, b in zip(resumed.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert (tmp_path / "split" / BEST_WEIGHTS).is_file()
