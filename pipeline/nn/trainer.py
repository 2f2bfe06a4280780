"""One resumable Keras training run, shared by the segmentation and classifier stages.

Every completed epoch publishes, atomically, a checkpoint (model + optimizer), the
callbacks' counters (plateau, early stopping, best score), the learning rate and the
full history; ``--resume`` picks up from there. The best weights are saved whenever the
monitored value improves and are loaded at the end, so an interrupted and resumed run
ends like an uninterrupted one.

With ``swa_top`` N >= 2 the weights of the N best epochs so far (by the monitor; or the
N last, ``swa_select: last``), the validated ones (the EMA's when there is one), are
also kept, as ``swa/epoch_EEE.h5``,
and at the end their uniform average replaces the best weights (stochastic weight
averaging over the best checkpoints); the caller re-estimates BatchNorm on it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.layout import BEST_WEIGHTS, CHECKPOINT, SWA, SWA_EPOCH, TENSORBOARD
from pipeline.core.schedule import Phase
from pipeline.nn.callbacks import AverageWeights, FirstOutputLogs, NanGuard, WeightAverage
from pipeline.nn.checkpoint import (
    draw_curves,
    load_state,
    publish_checkpoint,
    restore_checkpoint,
    write_history,
)
from pipeline.nn.keras_backend import get_value, keras, set_value, tf
from pipeline.nn.weights import (
    average_weight_files,
    load_best_weights,
    save_weights_atomic,
)

log = logging.getLogger(__name__)

# Keras-2 HDF5 format (not the ``.weights.h5`` one): the v3 loader hands h5py datasets
# to ``assign``, which breaks on the BatchNorm statistics of a MirroredStrategy model.
# curves.png is redrawn at most this often during training (and always at its end).
CURVES_EVERY_S = 60.0


@dataclass(frozen=True)
class FitSettings:
    """Everything the training loop needs besides the model and the data."""

    epochs: int
    monitor: str
    monitor_mode: str
    reduce_lr_factor: float
    reduce_lr_patience: int
    min_lr: float
    early_stopping_patience: int
    tensorboard: bool = False
    verbose: int = 1
    ema_decay: float | None = None
    swa_top: int = 0  # >= 2: average the weights of this many epochs at the end
    swa_select: str = "best"  # which epochs: the best by the monitor, or the last


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class _EpochState(keras.callbacks.Callback):
    """Publishes checkpoint, best weights, history and counters after every epoch."""

    def __init__(
        self,
        out_dir: Path,
        settings: FitSettings,
        plateau: keras.callbacks.ReduceLROnPlateau,
        early: keras.callbacks.EarlyStopping,
        state: dict[str, Any],
        phase: int,
        average: WeightAverage | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        super().__init__()
        self.average = average
        self.on_epoch = on_epoch
        self.out_dir = out_dir
        self.settings = settings
        self.plateau = plateau
        self.early = early
        self.state = state
        self.phase = phase
        self.started = 0.0
        self.plotted_at: float | None = None  # when curves.png was last drawn
        self.unplotted = False  # epochs since then

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # Keras resets these counters in their own on_train_begin; put back the saved ones.
        saved = self.state.get("callbacks")
        if saved:
            self.plateau.wait = saved["plateau_wait"]
            self.plateau.cooldown_counter = saved["plateau_cooldown"]
            self.plateau.best = saved["plateau_best"]
            self.early.wait = saved["early_wait"]
            self.early.best = saved["early_best"]

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = dict(logs or {})
        if self.settings.monitor not in logs:
            raise KeyError(
                f"train.monitor {self.settings.monitor!r} is not logged; available: {sorted(logs)}"
            )
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
        row.pop("learning_rate", None)  # Keras 3 logs it; the history keeps it as "lr"
        row["lr"] = get_value(self.model.optimizer.learning_rate)
        row["epoch_time"] = round(time.monotonic() - self.started, 2)
        history = [*self.state.get("history", []), row]
        value = logs[self.settings.monitor]
        best = self.state.get("best_value")
        better = best is None or (
            value > best if self.settings.monitor_mode == "max" else value < best
        )
        if better:
            self._save_validated(self.out_dir / BEST_WEIGHTS)
            self.state["best_value"] = float(value)
            self.state["best_epoch"] = epoch + 1
        dropped = self._keep_for_swa(epoch + 1, float(value)) if self.settings.swa_top > 1 else []
        self.state.update(
            epoch=epoch + 1,
            phase=self.phase,
            history=history,
            lr=row["lr"],
            callbacks={
                # EarlyStopping and ReduceLROnPlateau have already run for this epoch.
                "plateau_wait": int(self.plateau.wait),
                "plateau_cooldown": int(self.plateau.cooldown_counter),
                "plateau_best": float(self.plateau.best),
                "early_wait": int(self.early.wait),
                "early_best": float(self.early.best),
            },
        )
        publish_checkpoint(self.model, self.out_dir, self.state, self.average)
        for path in dropped:  # only once the published state no longer lists them
            path.unlink(missing_ok=True)
        # Drawing the curves costs ~0.7 s: at most every CURVES_EVERY_S, and at the end.
        now = time.monotonic()
        plot = self.plotted_at is None or now - self.plotted_at >= CURVES_EVERY_S
        write_history(history, self.out_dir, plot=plot)
        if plot:
            self.plotted_at = now
        self.unplotted = not plot
        log.info("epoch %d/%d %s", epoch + 1, self.settings.epochs, _summary(row))
        if self.on_epoch is not None:
            self.on_epoch(row)

    def _save_validated(self, path: Path) -> None:
        """Save the weights this epoch was validated with (the EMA's, if any)."""
        if self.average is None:
            save_weights_atomic(self.model, path)
        else:
            with self.average.swapped():
                save_weights_atomic(self.model, path)

    def _keep_for_swa(self, epoch: int, value: float) -> list[Path]:
        """Keep this epoch's weights if it is among the ``swa_top`` best; returns the
        files of the epochs it pushes out (deleted once the state is published)."""
        kept = [(float(v), int(e)) for v, e in self.state.get("swa", [])]
        top = _swa_choice([*kept, (value, epoch)], self.settings)
        if (value, epoch) in top:
            self._save_validated(swa_path(self.out_dir, epoch))
        self.state["swa"] = [[v, e] for v, e in top]
        return [swa_path(self.out_dir, e) for v, e in kept if (v, e) not in top]

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.unplotted:
            draw_curves(pd.DataFrame(self.state["history"]), self.out_dir)
            self.unplotted = False


def _swa_choice(candidates: Sequence[Sequence[float]], settings: FitSettings) -> list[tuple]:
    """The ``(value, epoch)`` pairs to keep: the ``swa_top`` best by the monitor (ties:
    the earlier epoch) or the ``swa_top`` last epochs (``swa_select``)."""
    pairs = [(float(v), int(e)) for v, e in candidates]
    if settings.swa_select == "last":
        return sorted(pairs, key=lambda item: item[1])[-settings.swa_top :]
    sign = -1.0 if settings.monitor_mode == "max" else 1.0
    return sorted(pairs, key=lambda item: (sign * item[0], item[1]))[: settings.swa_top]


def swa_path(out_dir: Path, epoch: int) -> Path:
    """The weights file of a kept epoch (``train.swa_top``)."""
    return out_dir / SWA / SWA_EPOCH.format(epoch=epoch)


def _summary(row: dict[str, float]) -> str:
    parts = [f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "lr", "epoch_time")]
    return " ".join([*parts, f"lr={row['lr']:.3g}", f"time={row['epoch_time']:.1f}s"])


def fit_resumable(
    model: keras.Model,
    compile_phase: Callable[[keras.Model, int, float], None],
    phases: Sequence[int | Phase],
    train_data: Callable[[int], tf.data.Dataset],
    val_ds: tf.data.Dataset,
    steps_per_epoch: int,
    out_dir: Path,
    settings: FitSettings,
    lr: float,
    resume: bool,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``settings.epochs`` in phases, resumable; load the best weights.

    ``phases`` (``schedule.Phase``, or plain start epochs) say where
    ``compile_phase(model, index, lr)`` (re)compiles the model with a fresh optimizer,
    e.g. to unfreeze the encoder after a warm-up; a phase's own ``lr``, when set, replaces
    the current learning rate as the phase begins (not when resuming inside it).
    ``train_data(epoch)`` is the endless training stream from the first sample of
    (0-based) ``epoch``: each ``fit`` (a phase, or a resumed run) continues the stream
    where an uninterrupted run would be.
    ``on_epoch(row)`` sees each completed epoch's row of the history (``epoch``, the
    logged figures, ``lr``, ``epoch_time``) once it is published (experiment tracking).
    Returns the final state (history, best epoch, ...).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = load_state(out_dir) if resume else None
    if state is None:
        if resume:
            log.info("nothing to resume in %s; starting from epoch 1", out_dir)
        state = {"epoch": 0, "history": [], "best_value": None}
        for stale in (CHECKPOINT, CHECKPOINT + ".old", SWA):
            if (out_dir / stale).exists():
                shutil.rmtree(out_dir / stale)
    if settings.swa_top > 1:
        missing = [swa_path(out_dir, int(e)) for _, e in state.get("swa", [])]
        missing = [path for path in missing if not path.is_file()]
        if missing:
            raise ValueError(
                f"{missing[0]} is missing: the run's state keeps that epoch for "
                f"train.swa_top; retrain the fold with --force"
            )
    plan = [p if isinstance(p, Phase) else Phase(int(p), 1.0) for p in phases]
    plan = [p for p in plan if p.start < settings.epochs]
    if not plan or plan[0].start != 0:
        plan.insert(0, Phase(0, 1.0))
    starts = [p.start for p in plan]
    bounds = [*starts[1:], settings.epochs]
    current_lr = float(state.get("lr", lr))
    average = None if settings.ema_decay is None else WeightAverage(model, settings.ema_decay)
    restored = state["epoch"] == 0
    stopped = bool(state.get("stopped", False))
    for phase, (start, end) in enumerate(zip(starts, bounds, strict=True)):
        if stopped or state["epoch"] >= end:
            continue
        phase_lr = plan[phase].lr
        if phase_lr is not None and state["epoch"] <= start:
            current_lr = float(phase_lr)
        compile_phase(model, phase, current_lr)
        if not restored:
            same_phase = state.get("phase") == phase
            restore_checkpoint(model, state, same_phase=same_phase, average=average)
            state.pop("_checkpoint")
            restored = True
        set_value(model.optimizer.learning_rate, current_lr)
        nan_guard = NanGuard()
        plateau = keras.callbacks.ReduceLROnPlateau(
            monitor=settings.monitor,
            mode=settings.monitor_mode,
            factor=settings.reduce_lr_factor,
            patience=settings.reduce_lr_patience,
            min_lr=settings.min_lr,
            verbose=1,
        )
        early = keras.callbacks.EarlyStopping(
            monitor=settings.monitor,
            mode=settings.monitor_mode,
            patience=settings.early_stopping_patience,
            verbose=1,
        )
        callbacks: list[keras.callbacks.Callback] = [
            nan_guard,
            plateau,
            early,
            _EpochState(out_dir, settings, plateau, early, state, phase, average, on_epoch),
        ]
        if average is not None:
            # First, so validation and the callbacks after it see the average.
            callbacks.insert(0, AverageWeights(average))
        if len(model.outputs) > 1:
            callbacks.insert(0, FirstOutputLogs(model.output_names[0]))
        if settings.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(out_dir / TENSORBOARD)))
        first_epoch = max(start, state["epoch"])
        model.fit(
            train_data(first_epoch),
            validation_data=val_ds,
            epochs=end,
            initial_epoch=first_epoch,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            verbose=settings.verbose,
        )
        if nan_guard.where is not None:
            raise TrainingDiverged(
                f"training diverged in {out_dir}: non-finite loss at {nan_guard.where}; "
                f"lower train.lr or check the data (the last good epoch is kept in "
                f"{out_dir / CHECKPOINT}, resume with --resume)"
            )
        current_lr = get_value(model.optimizer.learning_rate)
        if early.stopped_epoch > 0:
            stopped = True
            state["stopped"] = True
            publish_checkpoint(model, out_dir, state, average)
    if state.get("best_epoch") is None:
        raise RuntimeError(f"no epoch completed in {out_dir}; nothing to load")
    # Chosen again from the kept list: a resumed run may have lowered swa_top.
    kept = sorted(int(e) for _, e in _swa_choice(state.get("swa", []), settings))
    if settings.swa_top > 1 and len(kept) > 1:
        # From the kept files, never from best_weights.h5: a rerun gives the same average.
        average_weight_files(model, [swa_path(out_dir, e) for e in kept])
        save_weights_atomic(model, out_dir / BEST_WEIGHTS)
        state["swa_epochs"] = kept
        log.info(
            "weights of epochs %s (the %d %s) averaged into %s",
            kept,
            len(kept),
            f"best by {settings.monitor}" if settings.swa_select == "best" else "last",
            out_dir / BEST_WEIGHTS,
        )
        return state
    load_best_weights(model, out_dir / BEST_WEIGHTS)
    log.info(
        "best %s=%.4f at epoch %d; weights in %s",
        settings.monitor,
        state["best_value"],
        state["best_epoch"],
        out_dir / BEST_WEIGHTS,
    )
    return state
