"""fit_resumable asks for the training stream from the epoch it starts at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.schedule import Phase
from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.optim import make_optimizer
from pipeline.nn.trainer import FitSettings, fit_resumable

SETTINGS = dict(
    monitor="val_loss",
    monitor_mode="min",
    reduce_lr_factor=0.5,
    reduce_lr_patience=5,
    min_lr=1e-6,
    early_stopping_patience=10,
    verbose=0,
)


LINEAR_INITIAL = [np.full((3, 1), 0.3, np.float32), np.zeros((1,), np.float32)]


def linear_model() -> keras.Model:
    """A (None, 3) -> (None, 1) Dense layer set to LINEAR_INITIAL."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.set_weights(LINEAR_INITIAL)
    return model


def fit_linear(
    out_dir: Path,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    resume: bool,
    accumulation_steps: int,
    val_y: np.ndarray | None = None,
    **options: Any,
) -> tuple[keras.Model, dict]:
    """``fit_resumable`` of ``linear_model`` on 16 samples, 4 batches of 4 per epoch,
    validated on ``(x, val_y)`` (default ``y``); ``options`` are FitSettings fields."""
    model = linear_model()

    def train_data(epoch: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat().skip(4 * epoch)

    def compile_phase(net: keras.Model, phase: int, lr: float) -> None:
        net.compile(optimizer=make_optimizer(lr, accumulation_steps), loss="mse")

    val = tf.data.Dataset.from_tensor_slices((x, y if val_y is None else val_y)).batch(8)
    settings = FitSettings(epochs=epochs, **SETTINGS, **options)  # type: ignore[arg-type]
    state = fit_resumable(
        model, compile_phase, [0], train_data, val, 4, out_dir, settings, 0.05, resume
    )
    return model, state


def run(tmp_path, epochs, phases, resume, calls):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    x = np.ones((4, 3), np.float32)
    y = np.zeros((4, 1), np.float32)

    def train_data(epoch: int) -> tf.data.Dataset:
        calls.append(epoch)
        return tf.data.Dataset.from_tensors((x, y)).repeat()

    def compile_phase(net, phase, lr):
        net.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")

    val = tf.data.Dataset.from_tensors((x, y))
    return fit_resumable(
        model, compile_phase, phases, train_data, val, 2, tmp_path,
        FitSettings(epochs=epochs, **SETTINGS), 0.01, resume,
    )  # fmt: skip


def test_each_phase_and_a_resumed_run_continue_the_stream(tmp_path):
    calls: list[int] = []
    run(tmp_path, 3, [Phase(0, 1.0), Phase(2, 1.0)], False, calls)
    assert calls == [0, 2]  # the second phase starts at epoch 3's samples, not sample 0
    calls.clear()
    state = run(tmp_path, 5, [Phase(0, 1.0), Phase(2, 1.0)], True, calls)
    assert calls == [3] and state["epoch"] == 5  # resumed after 3 completed epochs
