"""fit_resumable asks for the training stream from the epoch it starts at."""

from __future__ import annotations

import numpy as np

from pipeline.core.schedule import Phase
from pipeline.nn.keras_backend import keras, tf
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
