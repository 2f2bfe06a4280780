"""train.swa_top: the best epochs' weights kept, averaged at the end, resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.layout import BEST_WEIGHTS, SWA
from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.trainer import swa_path
from pipeline.nn.weights import average_weight_files, load_best_weights, save_weights_atomic
from tests.unit.nn.test_trainer_stream import LINEAR_INITIAL as INITIAL
from tests.unit.nn.test_trainer_stream import fit_linear, linear_model

_rng = np.random.default_rng(11)
X = _rng.normal(size=(16, 3)).astype(np.float32)
Y = (X @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.3).astype(np.float32)


def _model() -> keras.Model:
    return linear_model()


def _fit(
    out_dir: Path,
    epochs: int,
    resume: bool,
    top: int,
    ema: float | None = None,
    select: str = "best",
    val_y: np.ndarray = Y,
) -> tuple[keras.Model, dict]:
    return fit_linear(
        out_dir, X, Y, epochs, resume, 1, val_y, swa_top=top, swa_select=select, ema_decay=ema
    )


def test_the_best_epochs_are_kept_and_their_average_is_the_result(tmp_path: Path) -> None:
    model, state = _fit(tmp_path, 5, False, 3)
    history = state["history"]
    best3 = sorted(history, key=lambda row: row["val_loss"])[:3]
    epochs = sorted(row["epoch"] for row in best3)
    assert state["swa_epochs"] == epochs
    files = sorted(p.name for p in (tmp_path / SWA).iterdir())
    assert files == [swa_path(tmp_path, e).name for e in epochs]  # the others were deleted
    # The model, and best_weights.h5, hold the mean of the kept epochs' weights.
    kept = []
    for epoch in epochs:
        probe = _model()
        load_best_weights(probe, swa_path(tmp_path, epoch))
        kept.append(probe.get_weights())
    mean = [np.mean([w[i] for w in kept], axis=0) for i in range(len(kept[0]))]
    for a, b in zip(model.get_weights(), mean, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    saved = _model()
    load_best_weights(saved, tmp_path / BEST_WEIGHTS)
    for a, b in zip(saved.get_weights(), mean, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # The kept epochs are distinct weights, so the average is none of them.
    assert not np.allclose(kept[0][0], kept[-1][0])


def test_swa_select_last_keeps_the_last_epochs_whatever_their_scores(tmp_path: Path) -> None:
    # Validation targets opposite to the training ones: the later epochs score worse.
    _, state = _fit(tmp_path, 6, False, 3, select="last", val_y=-Y)
    assert state["swa_epochs"] == [4, 5, 6]
    assert sorted(p.name for p in (tmp_path / SWA).iterdir()) == [
        swa_path(tmp_path, e).name for e in (4, 5, 6)
    ]
    _, best = _fit(tmp_path / "best", 6, False, 3, val_y=-Y)
    ranked = sorted(best["history"], key=lambda row: row["val_loss"])[:3]
    assert best["swa_epochs"] == sorted(row["epoch"] for row in ranked) == [1, 2, 3]


def test_a_resumed_run_keeps_and_averages_the_same_epochs(tmp_path: Path) -> None:
    whole, whole_state = _fit(tmp_path / "whole", 5, False, 3)
    _fit(tmp_path / "split", 3, False, 3)
    resumed, state = _fit(tmp_path / "split", 5, True, 3)
    assert state["swa_epochs"] == whole_state["swa_epochs"]
    assert min(state["swa_epochs"]) <= 3  # a file kept before the interruption is averaged
    for a, b in zip(resumed.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_resume_with_a_kept_file_missing_stops_before_training(tmp_path: Path) -> None:
    _, state = _fit(tmp_path, 2, False, 2)
    swa_path(tmp_path, state["swa_epochs"][0]).unlink()
    with pytest.raises(
        ValueError, match=r"epoch_001.h5 is missing: .*retrain the fold with --force"
    ):
        _fit(tmp_path, 4, True, 2)


def test_a_lower_swa_top_on_resume_averages_only_that_many(tmp_path: Path) -> None:
    _fit(tmp_path, 4, False, 3)
    _, state = _fit(tmp_path, 4, True, 2)  # finished: nothing trains, the average is redone
    assert len(state["swa_epochs"]) == 2


def test_with_an_ema_the_kept_files_are_the_validated_average(tmp_path: Path) -> None:
    _, state = _fit(tmp_path, 4, False, 2, ema=0.9)
    val = tf.data.Dataset.from_tensor_slices((X, Y)).batch(8)
    for epoch in state["swa_epochs"]:
        probe = _model()
        load_best_weights(probe, swa_path(tmp_path, epoch))
        probe.compile(loss="mse")
        logged = state["history"][epoch - 1]["val_loss"]
        assert probe.evaluate(val, verbose=0) == pytest.approx(logged, rel=1e-5)


def test_a_fresh_run_clears_an_old_runs_kept_epochs(tmp_path: Path) -> None:
    _fit(tmp_path, 4, False, 2)
    stale = swa_path(tmp_path, 99)
    stale.write_bytes(b"old")
    _, state = _fit(tmp_path, 2, False, 2)
    assert state["swa_epochs"] == [1, 2]
    assert not stale.exists()


def test_swa_off_keeps_nothing_and_loads_the_best_epoch(tmp_path: Path) -> None:
    model, state = _fit(tmp_path, 3, False, 0)
    assert "swa_epochs" not in state and not (tmp_path / SWA).exists()
    val = tf.data.Dataset.from_tensor_slices((X, Y)).batch(8)
    best = min(row["val_loss"] for row in state["history"])
    assert model.evaluate(val, verbose=0) == pytest.approx(best, rel=1e-5)


def test_average_weight_files_is_the_elementwise_mean(tmp_path: Path) -> None:
    model = _model()
    paths = []
    for i, scale in enumerate((1.0, 2.0, 6.0)):
        model.set_weights([w * scale + i for w in INITIAL])
        paths.append(tmp_path / f"w{i}.h5")
        save_weights_atomic(model, paths[-1])
    average_weight_files(model, paths)
    expected = [(w * 1.0 + w * 2.0 + w * 6.0 + 3) / 3 for w in INITIAL]
    for a, b in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(ValueError, match="no weights files to average"):
        average_weight_files(model, [])
