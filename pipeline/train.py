"""``python -m pipeline.train --fold K``: train one segmentation fold (or ``--all``).

Writes ``runs/<experiment>/fold_<K>/``: ``best_weights.h5``, ``history.csv``,
``curves.png``, ``checkpoint/`` (resume), ``oof/`` (validation probabilities at
submission size, uint8) and ``metrics.json`` (written last: the fold is finished).
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cli import (
    add_config_arguments,
    config_from_args,
    exit_process,
    guard_job_process,
    parse_fold_arguments,
    report_interrupt,
    setup_logging,
    sigterm_as_interrupt,
)
from pipeline.config import Config
from pipeline.data import (
    CropSampler,
    ImageCache,
    build_augmentation,
    make_eval_dataset,
    make_train_dataset,
    training_cache,
)
from pipeline.devices import make_strategy, set_mixed_precision, split_cpu
from pipeline.experiment import (
    Experiment,
    check_fold_number,
    check_trained_config,
    open_experiment,
    read_json,
    record_trained_config,
    write_json,
)
from pipeline.fold_jobs import FoldJob, FoldJobFailed, run_fold_jobs
from pipeline.inference import iter_batches, predict_tta
from pipeline.keras_backend import keras, tf
from pipeline.losses import get_loss, get_metrics
from pipeline.lr_schedule import resolve_lr
from pipeline.masks import resize_probs, truth_masks
from pipeline.metrics import kaggle_dice
from pipeline.model import build_segmentation_model, check_input_size, set_encoder_fraction
from pipeline.optim import make_optimizer
from pipeline.probstore import ProbWriter, dequantise_prob, quantise_prob
from pipeline.run_lock import hold_lock
from pipeline.sample_order import first_sample
from pipeline.schedule import training_phases
from pipeline.trainer import FitSettings, fit_resumable, load_state

log = logging.getLogger(__name__)

METRICS = "metrics.json"
OOF = "oof"


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and TensorFlow (ops stay nondeterministic unless TF is told)."""
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def fit_settings(section: Any, epochs: int | None = None) -> FitSettings:
    """FitSettings from a ``train``-like config section."""
    return FitSettings(
        epochs=int(epochs if epochs is not None else section.epochs),
        monitor=section.monitor,
        monitor_mode=section.monitor_mode,
        reduce_lr_factor=section.reduce_lr_factor,
        reduce_lr_patience=section.reduce_lr_patience,
        min_lr=section.min_lr,
        early_stopping_patience=section.early_stopping_patience,
        tensorboard=section.tensorboard,
        verbose=section.verbose,
    )


def build_model(config: Config, n_classes: int, input_size: Sequence[int] | None = None) -> Any:
    """The configured segmentation model (call inside the strategy scope)."""
    m = config.model
    return build_segmentation_model(
        m.architecture,
        m.backbone,
        n_classes,
        encoder_weights=m.encoder_weights,
        input_size=input_size,
        decoder_block_type=m.decoder_block_type,
        bn_momentum=m.bn_momentum,
        decoder_filters=m.decoder_filters,
    )


def is_finished(fold_dir: Path) -> bool:
    """A fold is finished once its ``metrics.json`` exists (it is written last)."""
    return (fold_dir / METRICS).is_file()


def train_fold(
    config: Config, fold: int, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """Train one fold, predict its validation images, return and save its metrics.

    The fold's lock (``run_lock``) is held throughout: a second trainer of the same
    fold, here or on another machine sharing the runs directory, is refused.
    """
    check_fold_number(config, fold)
    with hold_lock(config.fold_dir(fold), f"segmentation fold {fold}"):
        return _train_fold(config, fold, resume, force)


def _train_fold(config: Config, fold: int, resume: bool, force: bool) -> dict[str, Any]:
    seed_everything(config.seed)
    fold_dir = config.fold_dir(fold)
    if is_finished(fold_dir) and not force:
        raise FileExistsError(f"fold {fold} already finished ({fold_dir / METRICS}); pass --force")
    if (fold_dir / "checkpoint").exists() and not (resume or force):
        raise FileExistsError(
            f"fold {fold} has an interrupted run in {fold_dir}; pass --resume to continue "
            f"it or --force to start over"
        )
    if resume:
        load_state(fold_dir)  # a damaged checkpoint state is reported before anything is written
    t = config.train
    check_input_size(t.crop_size, "train.crop_size")
    if t.val_crop is not None:
        check_input_size(t.val_crop, "train.val_crop")
    else:
        check_input_size(config.data.image_size, "data.image_size (validation input)")
    check_trained_config(config, force)
    exp = open_experiment(config)
    if force:
        (fold_dir / METRICS).unlink(missing_ok=True)
    train_ids, val_ids = exp.members(fold)
    cache = training_cache(config, exp, config.data.image_size)
    record_trained_config(config, fold_dir)
    started = time.monotonic()
    mixed = set_mixed_precision(t.mixed_precision)
    strategy = make_strategy(t.strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch = t.batch_size * replicas
    steps = t.steps_per_epoch or max(1, len(train_ids) // global_batch)
    log.info(
        "fold %d: %d train / %d val images; %d replica(s) x batch %d, %d accumulated -> "
        "%d images per Adam step; %d steps per epoch",
        fold,
        len(train_ids),
        len(val_ids),
        replicas,
        t.batch_size,
        t.accumulation_steps,
        global_batch * t.accumulation_steps,
        steps,
    )
    sampler = CropSampler(cache, t.crop_size, build_augmentation(config.augment), config.seed)
    train_rows = cache.index_of(train_ids)

    def train_data(epoch: int) -> tf.data.Dataset:
        return make_train_dataset(
            sampler,
            train_rows,
            global_batch,
            config.seed + fold,
            t.num_parallel_calls,
            t.prefetch,
            start=first_sample(epoch, steps, global_batch),
        )

    val_ds = make_eval_dataset(cache, cache.index_of(val_ids), global_batch, t.val_crop, replicas)
    fixed = t.crop_size if config.model.architecture == "PSPNet" else None
    with strategy.scope():
        model = build_model(config, len(exp.classes), fixed)

    phases = training_phases(
        t.epochs, config.model.encoder_freeze_epochs, config.model.unfreeze_schedule
    )

    def compile_phase(net: keras.Model, phase: int, lr: float) -> None:
        n_layers = set_encoder_fraction(net, phases[phase].fraction)
        if len(phases) > 1:
            log.info(
                "phase %d from epoch %d: %d encoder layers trainable (top %.0f%%), lr %.3g",
                phase,
                phases[phase].start + 1,
                n_layers,
                100 * phases[phase].fraction,
                lr,
            )
        with strategy.scope():
            net.compile(
                optimizer=make_optimizer(lr, t.accumulation_steps),
                loss=get_loss(t.loss),
                metrics=get_metrics(t.metric_threshold, t.metric_min_area),
            )

    state = fit_resumable(
        model,
        compile_phase,
        phases,
        train_data,
        val_ds,
        steps,
        fold_dir,
        fit_settings(t),
        resolve_lr(config),
        resume,
    )
    train_time = time.monotonic() - started
    oof = predict_oof(config, exp, model, cache, val_ids, fold_dir / OOF)
    metrics = {
        "fold": fold,
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "best_epoch": state["best_epoch"],
        f"best_{t.monitor}": state["best_value"],
        "epochs_run": state["epoch"],
        "oof_kaggle_dice_050": oof["kaggle_dice"],
        "oof_kaggle_dice_050_per_class": oof["per_class"],
        "train_seconds": round(train_time, 1),
        "oof_seconds": oof["seconds"],
        "device": _device_name(),
        "replicas": replicas,
        "mixed_precision": mixed,
    }
    write_json(fold_dir / METRICS, metrics)
    log.info("fold %d finished: OOF Kaggle Dice at 0.5 = %.4f", fold, oof["kaggle_dice"])
    return metrics


def predict_oof(
    config: Config,
    exp: Experiment,
    model: keras.Model,
    cache: ImageCache,
    val_ids: Sequence[str],
    out_dir: Path,
) -> dict[str, Any]:
    """Predict the validation images (TTA from config) into a prob store at submission size.

    Returns the Kaggle Dice at threshold 0.5 against the truth at the same size.
    """
    started = time.monotonic()
    rows = cache.index_of(val_ids)
    rles = exp.rles()
    size = config.data.submission_size
    scores = []
    with ProbWriter(out_dir, exp.classes, overwrite=True) as writer:
        for batch in iter_batches(len(rows), config.tta.batch_size):
            idx = rows[batch]
            probs = predict_tta(
                model, np.asarray(cache.images[idx]), config.tta.views, config.tta.merge
            )
            for i, prob in zip(idx, probs, strict=True):
                image_id = cache.image_ids[i]
                original = (int(cache.original_sizes[i][0]), int(cache.original_sizes[i][1]))
                target = size if size is not None else original
                q = quantise_prob(resize_probs(prob, target))
                writer.add(image_id, q)
                truth = truth_masks(rles[image_id], original, target)
                # Scored on the stored uint8 values, so the tuner's plain-0.5 score agrees.
                stored = dequantise_prob(q)[None]
                scores.append(kaggle_dice(truth[None], stored, threshold=0.5)[0])
    per_image = np.stack(scores)  # (N, C)
    return {
        "kaggle_dice": float(per_image.mean()),
        "per_class": dict(zip(exp.classes, per_image.mean(axis=0).round(6).tolist(), strict=True)),
        "seconds": round(time.monotonic() - started, 1),
    }


def _device_name() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{len(gpus)} x {details.get('device_name', 'GPU')}"
    return "CPU"


def run_parallel(
    config: Config, jobs: Sequence[FoldJob], resume: bool = False, force: bool = False
) -> None:
    """Run fold jobs as ``train.parallel_folds`` child processes at once.

    The split and the image caches the jobs read are made here first, so that no two
    children make them at the same time.
    """
    exp = open_experiment(config)
    for job in jobs:
        exp.check_fold(job.fold)
    sizes = {tuple(config.data.image_size)}
    if any(job.stage == "classifier" for job in jobs):
        sizes.add(tuple(config.classifier.image_size))
    for size in sorted(sizes):
        training_cache(config, exp, size)
    run_fold_jobs(config, jobs, config.train.parallel_folds, resume=resume, force=force)


def train_folds(
    config: Config, folds: Sequence[int], resume: bool = False, force: bool = False
) -> list[dict[str, Any]]:
    """Train several folds; finished folds are skipped unless ``force``.

    One after the other in this process, or with ``train.parallel_folds`` > 1 as that
    many child processes at once.
    """
    pending = [k for k in folds if force or not is_finished(config.fold_dir(k))]
    if config.train.parallel_folds > 1 and len(pending) > 1:
        run_parallel(config, [FoldJob("segmentation", k) for k in pending], resume, force)
        return [read_metrics(config.fold_dir(k)) for k in folds]
    results = []
    for fold in folds:
        fold_dir = config.fold_dir(fold)
        if is_finished(fold_dir) and not force:
            log.info("fold %d already finished (%s); skipping", fold, fold_dir / METRICS)
            results.append(read_metrics(fold_dir))
            continue
        results.append(train_fold(config, fold, resume=resume, force=force))
    return results


def read_metrics(fold_dir: Path) -> dict[str, Any]:
    """A finished fold's metrics.json."""
    return read_json(
        fold_dir / METRICS, "train the fold (again, with --force): python -m pipeline.train"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument(
        "--logical-cpus",
        type=int,
        default=0,
        help="split the CPU into N logical devices (to exercise the multi-device path)",
    )
    args = parse_fold_arguments(parser, argv)
    setup_logging()
    guard_job_process()
    try:
        with sigterm_as_interrupt():
            config = config_from_args(args)
            split_cpu(args.logical_cpus)
            folds = range(config.folds.n_splits) if args.all else [args.fold]
            results = train_folds(config, list(folds), resume=args.resume, force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    except FoldJobFailed as exc:
        log.error("%s\ncontinue with --resume once the cause is fixed", exc)
        return 1
    except KeyboardInterrupt:
        return report_interrupt(f"python -m pipeline.train --config {args.config} --all")
    for r in results:
        print(f"fold {r['fold']}: OOF Kaggle Dice at 0.5 = {r['oof_kaggle_dice_050']:.4f}")
    if len(results) > 1:
        mean = float(np.mean([r["oof_kaggle_dice_050"] for r in results]))
        print(f"mean over {len(results)} folds: {mean:.4f}")
    return 0


if __name__ == "__main__":
    exit_process(main())
