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

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.curves import plot_history
from pipeline.core.layout import (
    BEST_WEIGHTS,
    CHECKPOINT,
    CURVES,
    HISTORY,
    STATE,
    SWA,
    SWA_EPOCH,
    TENSORBOARD,
)
from pipeline.core.schedule import Phase
from pipeline.nn.keras_backend import keras, tf

log = logging.getLogger(__name__)

# Keras-2 HDF5 layout (not the ``.weights.h5`` one): the v3 loader hands h5py datasets
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


class WeightAverage(tf.Module):
    """An exponential moving average (EMA) of every weight of a model.

    ``update()`` runs after each applied optimizer step (not after each accumulated
    micro-batch): ``shadow = d * shadow + (1 - d) * weight`` with
    ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update, so a short run is not
    dominated by its initial weights (TensorFlow's ExponentialMovingAverage with
    ``num_updates``). BatchNorm statistics are averaged with the rest. ``swap()``
    exchanges the model's weights and the average; the checkpoint saves both.
    """

    def __init__(self, model: keras.Model, decay: float) -> None:
        super().__init__(name="weight_average")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null; got {decay}")
        self.decay = float(decay)
        # One fixed order whatever the layers' trainable flags (they change by phase).
        with all_trainable(model):
            self._weights = list(model.weights)
        with model.distribute_strategy.scope():
            self.shadow = [
                tf.Variable(w.read_value(), trainable=False, name=f"ema_{i}")
                for i, w in enumerate(self._weights)
            ]
            self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="ema_updates")

    @tf.function
    def update(self) -> None:
        """Move the average one step towards the current weights."""
        self.updates.assign_add(1)
        n = tf.cast(self.updates, tf.float32)
        decay = tf.minimum(tf.constant(self.decay, tf.float32), (1.0 + n) / (10.0 + n))
        for average, weight in zip(self.shadow, self._weights, strict=True):
            d = tf.cast(decay, average.dtype)
            average.assign(average * d + tf.cast(weight, average.dtype) * (1 - d))

    @tf.function
    def swap(self) -> None:
        """Exchange the model's weights and the average."""
        for average, weight in zip(self.shadow, self._weights, strict=True):
            current = tf.identity(weight.read_value())
            weight.assign(average.read_value())
            average.assign(current)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the model for the block, the trained weights back after."""
        self.swap()
        try:
            yield
        finally:
            self.swap()


class _AverageWeights(keras.callbacks.Callback):
    """Updates a ``WeightAverage`` after each applied step; validates with the average."""

    def __init__(self, average: WeightAverage) -> None:
        super().__init__()
        self.average = average
        self.last_iteration = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.last_iteration = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        iteration = int(self.model.optimizer.iterations.numpy())
        if iteration != self.last_iteration:  # an accumulated micro-batch changes nothing
            self.last_iteration = iteration
            self.average.update()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.average.swap()

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self.average.swap()


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class _NanGuard(keras.callbacks.Callback):
    """Stop at the first non-finite loss and remember where, for a clear error."""

    def __init__(self) -> None:
        super().__init__()
        self.where: str | None = None
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.where = f"epoch {self.epoch + 1}, batch {batch + 1} (loss={loss})"
            self.model.stop_training = True


class FirstOutputLogs(keras.callbacks.Callback):
    """A multi-output model's logs under the single-output names: Keras prefixes the
    metrics of output ``prob`` (``val_prob_dice``); this renames them back
    (``val_dice``) so ``train.monitor``, the history and every callback after it read
    the same keys with or without a presence head. The total ``loss`` stays as it is;
    the outputs' own losses keep their prefixes (``prob_loss``, ``presence_loss``).
    First in the callback list: the logs dict is shared by the callbacks after it."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.prefixes = (f"{output}_", f"val_{output}_")

    def _rename(self, logs: dict[str, Any] | None) -> None:
        if not logs:
            return
        for key in list(logs):
            for prefix in self.prefixes:
                if key.startswith(prefix) and not key.endswith("_loss"):
                    plain = ("val_" if prefix.startswith("val_") else "") + key[len(prefix) :]
                    logs[plain] = logs.pop(key)
                    break

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._rename(logs)

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self._rename(logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._rename(logs)


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
    ) -> None:
        super().__init__()
        self.average = average
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
        row["lr"] = float(keras.backend.get_value(self.model.optimizer.learning_rate))
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
        _publish_checkpoint(self.model, self.out_dir, self.state, self.average)
        for path in dropped:  # only once the published state no longer lists them
            path.unlink(missing_ok=True)
        # Drawing the curves costs ~0.7 s: at most every CURVES_EVERY_S, and at the end.
        now = time.monotonic()
        plot = self.plotted_at is None or now - self.plotted_at >= CURVES_EVERY_S
        _write_history(history, self.out_dir, plot=plot)
        if plot:
            self.plotted_at = now
        self.unplotted = not plot
        log.info("epoch %d/%d %s", epoch + 1, self.settings.epochs, _summary(row))

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
            _draw_curves(pd.DataFrame(self.state["history"]), self.out_dir)
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


def average_weight_files(model: keras.Model, paths: Sequence[Path]) -> None:
    """Set ``model``'s weights (BatchNorm statistics included) to the mean of the files'."""
    total: list[Any] | None = None
    for path in paths:
        load_best_weights(model, path)
        with all_trainable(model):
            weights = model.get_weights()
        total = weights if total is None else [a + w for a, w in zip(total, weights, strict=True)]
    if total is None:
        raise ValueError("no weights files to average")
    with all_trainable(model):
        model.set_weights([w / len(paths) for w in total])


def _summary(row: dict[str, float]) -> str:
    parts = [f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "lr", "epoch_time")]
    return " ".join([*parts, f"lr={row['lr']:.3g}", f"time={row['epoch_time']:.1f}s"])


@contextmanager
def all_trainable(model: keras.Model) -> Iterator[None]:
    """Every layer trainable for the duration, then each layer's own flag back.

    The Keras-2 HDF5 layout stores a layer's weights as trainable + non-trainable, so the
    order depends on what is frozen: a file saved mid-way through progressive
    unfreezing would not load into a model frozen differently (or into the fully
    trainable model that prediction builds). Saving and loading all-trainable makes the
    order canonical. Flags are restored parents first (setting a parent's flag resets
    its children's).
    """
    layers = list(model._flatten_layers(include_self=True, recursive=True))
    flags = [layer.trainable for layer in layers]
    model.trainable = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.trainable = flag


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """``source``'s weights into ``target`` (the same architecture, any strategy or
    precision policy), both all-trainable so the weight lists share one order."""
    with all_trainable(source), all_trainable(target):
        target.set_weights(source.get_weights())


def copy_model(model: keras.Model, build: Callable[[], keras.Model]) -> keras.Model:
    """A model from ``build()`` holding ``model``'s weights."""
    copy = build()
    copy_weights(model, copy)
    return copy


def save_weights_atomic(model: keras.Model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("tmp." + path.name)
    with all_trainable(model):
        model.save_weights(str(tmp))
    os.replace(tmp, path)


def load_best_weights(model: keras.Model, path: Path) -> None:
    """Load a file written by the trainer, whatever the model's frozen layers.

    A missing, truncated or foreign file is a ValueError naming it and what to do.
    """
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; train that fold first")
    try:
        with all_trainable(model):
            model.load_weights(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"weights file {path} is damaged or from another model ({exc}); retrain its "
            f"fold with --force"
        ) from None


def _checkpoint(
    model: keras.Model, average: WeightAverage | None = None, optimizer: bool = True
) -> tf.train.Checkpoint:
    parts: dict[str, Any] = {"model": model}
    if optimizer:
        parts["optimizer"] = model.optimizer
    if average is not None:
        parts["ema"] = average
    return tf.train.Checkpoint(**parts)


def _publish_checkpoint(
    model: keras.Model,
    out_dir: Path,
    state: dict[str, Any],
    average: WeightAverage | None = None,
) -> None:
    """Write checkpoint + state under a temporary name, then swap it in."""
    final = out_dir / CHECKPOINT
    tmp = out_dir / (CHECKPOINT + ".tmp")
    old = out_dir / (CHECKPOINT + ".old")
    for path in (tmp, old):
        if path.exists():
            shutil.rmtree(path)
    tmp.mkdir(parents=True)
    _checkpoint(model, average).write(str(tmp / "ckpt"))
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _write_history(history: list[dict[str, float]], out_dir: Path, plot: bool = True) -> None:
    frame = pd.DataFrame(history)
    tmp = out_dir / (HISTORY + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, out_dir / HISTORY)
    if plot:
        _draw_curves(frame, out_dir)


def _draw_curves(frame: pd.DataFrame, out_dir: Path) -> None:
    try:
        plot_history(frame, out_dir / CURVES, title=out_dir.name)
    except (ValueError, RuntimeError) as exc:  # a plot must never cost a training run
        log.warning("could not draw %s: %s", out_dir / CURVES, exc)


def load_state(out_dir: Path) -> dict[str, Any] | None:
    """The last published epoch state of a run directory, or None if there is none."""
    # A crash between the two renames of _publish_checkpoint leaves only ".old".
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = out_dir / name / STATE
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"{path} is damaged ({exc}): resume cannot continue from it; "
                    f"retrain the fold with --force"
                ) from None
            state["_checkpoint"] = str(out_dir / name / "ckpt")
            return state
    return None


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
) -> dict[str, Any]:
    """Train ``model`` for ``settings.epochs`` in phases, resumable; load the best weights.

    ``phases`` (``schedule.Phase``, or plain start epochs) say where
    ``compile_phase(model, index, lr)`` (re)compiles the model with a fresh optimizer,
    e.g. to unfreeze the encoder after a warm-up; a phase's own ``lr``, when set, replaces
    the current learning rate as the phase begins (not when resuming inside it).
    ``train_data(epoch)`` is the endless training stream from the first sample of
    (0-based) ``epoch``: each ``fit`` (a phase, or a resumed run) continues the stream
    where an uninterrupted run would be.
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
            _restore(model, state, same_phase=state.get("phase") == phase, average=average)
            state.pop("_checkpoint")
            restored = True
        keras.backend.set_value(model.optimizer.learning_rate, current_lr)
        nan_guard = _NanGuard()
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
            _EpochState(out_dir, settings, plateau, early, state, phase, average),
        ]
        if average is not None:
            # First, so validation and the callbacks after it see the average.
            callbacks.insert(0, _AverageWeights(average))
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
        current_lr = float(keras.backend.get_value(model.optimizer.learning_rate))
        if early.stopped_epoch > 0:
            stopped = True
            state["stopped"] = True
            _publish_checkpoint(model, out_dir, state, average)
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


def _restore(
    model: keras.Model,
    state: dict[str, Any],
    same_phase: bool,
    average: WeightAverage | None = None,
) -> None:
    """Load the saved model (and, within the same phase, optimizer) variables."""
    try:
        if same_phase:
            # Create the optimizer's slots now so the checkpoint fills them immediately.
            model.optimizer.build(model.trainable_variables)
        checkpoint = _checkpoint(model, average, optimizer=same_phase)
        checkpoint.read(state["_checkpoint"]).expect_partial()
    except (tf.errors.OpError, OSError, ValueError, IndexError, KeyError) as exc:
        directory = Path(state["_checkpoint"]).parent
        raise ValueError(
            f"checkpoint {directory} is damaged ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); retrain the fold with --force"
        ) from None
    log.info("resumed from epoch %d (%s)", state["epoch"], state["_checkpoint"])
