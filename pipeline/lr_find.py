"""``python -m pipeline.lr_find``: the learning-rate range test on one fold's training input.

Builds the configured model and fold K's training input exactly as ``pipeline.train``
does, then trains for ``lr_find.steps`` batches while the learning rate grows
exponentially from ``lr_find.start_lr`` to ``lr_find.end_lr``, one Adam step per batch
(no accumulation). Stops once the smoothed loss exceeds ``lr_find.diverge_factor`` x
its minimum or a loss is not finite. Writes ``runs/<experiment>/lr_find/``:
``lr_find.csv`` (lr, loss, smoothed), ``lr_find.png`` and ``lr_find.json`` (the
suggestion, which ``train.lr: auto`` reads). The weights are thrown away.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.core.atomic import atomic_path, write_csv
from pipeline.core.config import Config
from pipeline.core.exclusive import is_exclusive
from pipeline.core.layout import LR_FIND_CSV, LR_FIND_DIR, LR_FIND_JSON, LR_FIND_PNG
from pipeline.core.lr_range import (
    LrSuggestion,
    ema_lag_decades,
    exponential_lrs,
    find_divergence,
    range_test_frame,
    resolve_lr,
    smooth_losses,
    suggest_lr,
)
from pipeline.nn.data import CropSampler, build_augmentation, make_train_dataset
from pipeline.nn.devices import make_strategy, seed_everything, set_mixed_precision
from pipeline.nn.keras_backend import check_framework, keras, set_value, tf
from pipeline.nn.losses import segmentation_compile_args, with_presence_targets
from pipeline.nn.model import build_model, check_input_size
from pipeline.nn.optim import make_optimizer
from pipeline.run.command import Command, config_from_args
from pipeline.run.experiment import Experiment, open_experiment
from pipeline.run.fold_records import check_fold_number
from pipeline.run.image_cache import training_cache
from pipeline.run.json_files import write_json

__all__ = ["RangeTestCallback", "main", "plot_range_test", "resolve_lr", "run_lr_find"]

log = logging.getLogger(__name__)

# Above this lag the smoothed curve's features sit visibly to the right of the raw ones.
MAX_LAG_DECADES = 0.5
NO_MINIMUM_WARNING = (
    "the smoothed loss was still falling near the last step, so the test never reached "
    "the lr where training breaks down and the suggestion is unreliable: raise "
    "lr_find.end_lr or lower lr_find.smoothing"
)


class RangeTestCallback(keras.callbacks.Callback):
    """Sets the learning rate of batch i to ``lrs[i]``, records each batch's loss and
    stops training at the first batch ``find_divergence`` flags."""

    def __init__(self, lrs: np.ndarray, smoothing: float, diverge_factor: float) -> None:
        super().__init__()
        self.lrs = lrs
        self.smoothing = smoothing
        self.diverge_factor = diverge_factor
        self.losses: list[float] = []
        self.stop_index: int | None = None
        self._log_every = max(1, len(lrs) // 10)

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # Keras logs the running mean of the epoch; a reset per batch makes it the batch loss.
        self.model.reset_metrics()
        set_value(self.model.optimizer.learning_rate, self.lrs[batch])

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.losses.append(float((logs or {}).get("loss", math.nan)))
        self.stop_index = find_divergence(self.losses, self.smoothing, self.diverge_factor)
        if self.stop_index is not None:
            self.model.stop_training = True
        if (batch + 1) % self._log_every == 0 or self.stop_index is not None:
            smoothed = smooth_losses(self.losses, self.smoothing)[-1]
            log.info(
                "lr_find step %d/%d: lr=%.3g loss=%.4f smoothed=%.4f",
                batch + 1,
                len(self.lrs),
                self.lrs[batch],
                self.losses[-1],
                smoothed,
            )


def _fold_training_input(
    config: Config, exp: Experiment, fold: int, global_batch: int
) -> tf.data.Dataset:
    """Fold ``fold``'s endless training batches, as ``pipeline.train.train_fold`` makes them."""
    train_ids, _ = exp.members(fold)
    cache = training_cache(config, exp, config.data.image_size)
    t = config.train
    sampler = CropSampler(
        cache,
        t.crop_size,
        build_augmentation(config.augment),
        config.seed,
        is_exclusive(config.model.activation),
    )
    return make_train_dataset(
        sampler,
        cache.index_of(train_ids),
        global_batch,
        config.seed + fold,
        t.num_parallel_calls,
        t.prefetch,
    )


def run_lr_find(config: Config, fold: int = 0) -> dict[str, Any]:
    """Run the range test on fold ``fold``; write csv, png and json; return the json."""
    check_framework(str(config.framework), config.source or "the config")
    lf, t, m = config.lr_find, config.train, config.model
    lrs = exponential_lrs(lf.start_lr, lf.end_lr, lf.steps)
    find_divergence([], lf.smoothing, lf.diverge_factor)  # checks both settings up front
    check_input_size(t.crop_size, "train.crop_size")
    check_fold_number(config, fold)
    seed_everything(config.seed)
    exp = open_experiment(config)
    started = time.monotonic()
    set_mixed_precision(t.mixed_precision)
    strategy = make_strategy(t.strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch = t.batch_size * replicas
    train_ds = _fold_training_input(config, exp, fold, global_batch)
    fixed = t.crop_size if config.model.architecture == "PSPNet" else None
    with strategy.scope():
        model = build_model(config, len(exp.classes), fixed)
        # The loss training uses (with a presence head, its weighted term too), no metrics.
        compiled = segmentation_compile_args(
            model, t.loss, t.metric_threshold, t.metric_min_area, m.classification_head_weight
        )
        model.compile(
            optimizer=make_optimizer(float(lrs[0]), 1),
            loss=compiled["loss"],
            loss_weights=compiled.get("loss_weights"),
        )
    train_ds = with_presence_targets(train_ds, model)
    log.info(
        "lr_find on fold %d: %d steps of %d images, lr %.3g -> %.3g",
        fold,
        lf.steps,
        global_batch,
        lf.start_lr,
        lf.end_lr,
    )
    callback = RangeTestCallback(lrs, lf.smoothing, lf.diverge_factor)
    model.fit(train_ds, epochs=1, steps_per_epoch=lf.steps, callbacks=[callback], verbose=0)
    recorded = np.asarray(callback.losses, dtype=np.float64)
    stopped_early = callback.stop_index is not None
    suggestion = suggest_lr(lrs[: recorded.size], recorded, lf.smoothing, stopped_early)
    frame = range_test_frame(lrs[: recorded.size], recorded, lf.smoothing)
    out_dir = config.run_dir / LR_FIND_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / LR_FIND_CSV, frame)
    title = f"{config.experiment} fold {fold}: batch {global_batch}, {len(frame)} steps"
    plot_range_test(frame, suggestion, out_dir / LR_FIND_PNG, title)
    result = {
        "experiment": config.experiment,
        "fold": fold,
        **suggestion.to_dict(),
        "steps_run": len(frame),
        "steps_planned": lf.steps,
        "stopped_early": stopped_early,
        "stop_reason": _stop_reason(recorded, callback.stop_index, lf.diverge_factor),
        "warnings": range_test_warnings(suggestion, lf),
        "images_per_step": global_batch,
        "replicas": replicas,
        "training_accumulation_steps": t.accumulation_steps,
        "training_images_per_step": global_batch * t.accumulation_steps,
        "batch_note": batch_note(suggestion.suggested_lr, global_batch, t.accumulation_steps),
        "start_lr": lf.start_lr,
        "end_lr": lf.end_lr,
        "smoothing": lf.smoothing,
        "diverge_factor": lf.diverge_factor,
        "loss": t.loss,
        "model": f"{config.model.architecture}/{config.model.backbone}",
        "crop_size": t.crop_size,
        "seconds": round(time.monotonic() - started, 1),
    }
    write_json(out_dir / LR_FIND_JSON, result)
    return result


def range_test_warnings(suggestion: LrSuggestion, settings: Any) -> list[str]:
    """Why a suggestion may be off: no minimum in range, or a smoothing that lags."""
    warnings = [] if suggestion.minimum_inside_range else [NO_MINIMUM_WARNING]
    lag = ema_lag_decades(settings.smoothing, settings.start_lr, settings.end_lr, settings.steps)
    if lag > MAX_LAG_DECADES:
        steps = settings.smoothing / (1 - settings.smoothing)
        warnings.append(
            f"lr_find.smoothing={settings.smoothing:g} averages over about {steps:.0f} steps, "
            f"{lag:.1f} decades of lr at {settings.steps} steps from {settings.start_lr:g} "
            f"to {settings.end_lr:g}: the smoothed curve trails the raw losses and shows its "
            f"fall and its minimum at too high an lr; lower lr_find.smoothing (0.9 lags "
            f"{ema_lag_decades(0.9, settings.start_lr, settings.end_lr, settings.steps):.2f} "
            f"decades) or raise lr_find.steps"
        )
    return warnings


def _stop_reason(losses: np.ndarray, stop_index: int | None, factor: float) -> str | None:
    if stop_index is None:
        return None
    if not np.isfinite(losses[stop_index]):
        return f"non-finite loss at step {stop_index + 1}"
    return f"smoothed loss above {factor:g}x its minimum at step {stop_index + 1}"


def batch_note(lr: float, images_per_step: int, accumulation_steps: int) -> str:
    """How the range test's batch relates to training's (the linear-scaling caveat)."""
    if accumulation_steps <= 1:
        return f"the range test and training both take one Adam step per {images_per_step} images"
    effective = images_per_step * accumulation_steps
    return (
        f"the range test took one Adam step per {images_per_step} images; training "
        f"accumulates {accumulation_steps} batches ({effective} images per step). The linear "
        f"scaling rule (lr proportional to batch, made for SGD) would allow up to "
        f"{accumulation_steps}x the suggestion ({lr * accumulation_steps:.3g}); for Adam the "
        f"square-root rule ({math.sqrt(accumulation_steps):.3g}x, "
        f"{lr * math.sqrt(accumulation_steps):.3g}) is the usual compromise. train.lr: auto "
        f"uses the suggestion unscaled, the conservative choice."
    )


def plot_range_test(
    frame: pd.DataFrame, suggestion: LrSuggestion, path: Path, title: str = ""
) -> Path:
    """Smoothed loss vs lr (log axis), raw loss faint, the suggestions marked; atomic PNG.

    ``frame`` has float columns ``lr``, ``loss``, ``smoothed`` (``range_test_frame``).
    """
    fig = Figure(figsize=(7, 4.2))  # no pyplot: no global matplotlib state touched
    ax = fig.subplots()
    ax.plot(frame["lr"], frame["loss"], color="tab:blue", alpha=0.25, linewidth=1, label="loss")
    ax.plot(frame["lr"], frame["smoothed"], color="tab:blue", linewidth=2, label="smoothed")
    ax.axvline(
        suggestion.suggested_lr,
        color="tab:red",
        linewidth=1.5,
        label=f"suggested {suggestion.suggested_lr:.2g} ({suggestion.rule})",
    )
    if suggestion.steep_lr is not None and suggestion.steep_lr != suggestion.suggested_lr:
        ax.axvline(
            suggestion.steep_lr,
            color="tab:orange",
            linestyle="--",
            label=f"steepest {suggestion.steep_lr:.2g}",
        )
    if suggestion.min_over_10_lr != suggestion.suggested_lr:
        ax.axvline(
            suggestion.min_over_10_lr,
            color="tab:green",
            linestyle="--",
            label=f"minimum/10 {suggestion.min_over_10_lr:.2g}",
        )
    ax.plot(
        suggestion.min_loss_lr,
        frame["smoothed"].iloc[suggestion.min_index],
        "o",
        color="black",
        label=f"minimum at {suggestion.min_loss_lr:.2g}",
    )
    smoothed = frame["smoothed"].to_numpy()
    smoothed = smoothed[np.isfinite(smoothed)]
    raw = frame["loss"].to_numpy()
    raw = raw[np.isfinite(raw)]
    # Show the smoothed curve whole and the bulk of the raw losses, not the divergence spike.
    low = min(float(smoothed.min()), float(np.percentile(raw, 5)))
    high = max(float(smoothed.max()), float(np.percentile(raw, 90)))
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.1
    ax.set_ylim(low - pad, high + pad)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, dpi=90)
    return path


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fold", type=int, default=0, help="fold whose training images to use")


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = run_lr_find(config, args.fold)
    steep = result["steep_lr"]
    print(f"suggested lr: {result['suggested_lr']:.3g} ({result['rule']})")
    print(
        f"  loss minimum at lr {result['min_loss_lr']:.3g} (minimum/10 = "
        f"{result['min_over_10_lr']:.3g})"
    )
    print(
        f"  steepest descent at lr {steep:.3g}"
        if steep is not None
        else "  no descent found before the minimum"
    )
    print(
        f"  {result['steps_run']}/{result['steps_planned']} steps"
        + (f", stopped: {result['stop_reason']}" if result["stopped_early"] else "")
    )
    for warning in result["warnings"]:
        print(f"  warning: {warning}")
    print(f"  note: {result['batch_note']}")
    print(
        f"  written: {config.run_dir / LR_FIND_DIR}/{{{LR_FIND_CSV}, {LR_FIND_PNG}, "
        f"{LR_FIND_JSON}}}"
    )
    return 0


COMMAND = Command(
    stage="lr-find",
    description=__doc__,
    add_arguments=_add_arguments,
    run=_run,
    examples=("--config configs/demo.yaml", "--config configs/demo.yaml --fold 1"),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
