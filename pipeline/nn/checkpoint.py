"""A training run's resumable state on disk: the checkpoint, its state and the history.

Every completed epoch publishes, atomically (a temporary directory swapped in), the
model and optimizer variables (and the EMA's) with the callbacks' counters as
``checkpoint/``; ``load_state`` finds the last one published, even after a crash
between the two renames, and ``restore_checkpoint`` reads it back into a model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.atomic import replace_directory, write_csv
from pipeline.core.curves import plot_history
from pipeline.core.layout import CHECKPOINT, CURVES, HISTORY, STATE
from pipeline.nn.callbacks import WeightAverage
from pipeline.nn.keras_backend import keras, tf

log = logging.getLogger(__name__)


def checkpoint_of(
    model: keras.Model, average: WeightAverage | None = None, optimizer: bool = True
) -> tf.train.Checkpoint:
    parts: dict[str, Any] = {"model": model}
    if optimizer:
        parts["optimizer"] = model.optimizer
    if average is not None:
        parts["ema"] = average
    return tf.train.Checkpoint(**parts)


def publish_checkpoint(
    model: keras.Model,
    out_dir: Path,
    state: dict[str, Any],
    average: WeightAverage | None = None,
) -> None:
    """Write checkpoint + state under a temporary name, then swap it in."""
    tmp = out_dir / (CHECKPOINT + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    checkpoint_of(model, average).write(str(tmp / "ckpt"))
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    replace_directory(tmp, out_dir / CHECKPOINT)


def write_history(history: list[dict[str, float]], out_dir: Path, plot: bool = True) -> None:
    frame = pd.DataFrame(history)
    write_csv(out_dir / HISTORY, frame)
    if plot:
        draw_curves(frame, out_dir)


def draw_curves(frame: pd.DataFrame, out_dir: Path) -> None:
    try:
        plot_history(frame, out_dir / CURVES, title=out_dir.name)
    except (ValueError, RuntimeError) as exc:  # a plot must never cost a training run
        log.warning("could not draw %s: %s", out_dir / CURVES, exc)


def load_state(out_dir: Path) -> dict[str, Any] | None:
    """The last published epoch state of a run directory, or None if there is none."""
    # A crash between the two renames of publish_checkpoint leaves only ".old".
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


def restore_checkpoint(
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
        checkpoint = checkpoint_of(model, average, optimizer=same_phase)
        checkpoint.read(state["_checkpoint"]).expect_partial()
    except (tf.errors.OpError, OSError, ValueError, IndexError, KeyError) as exc:
        directory = Path(state["_checkpoint"]).parent
        raise ValueError(
            f"checkpoint {directory} is damaged ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); retrain the fold with --force"
        ) from None
    log.info("resumed from epoch %d (%s)", state["epoch"], state["_checkpoint"])
