"""``python -m pipeline.train_classifier --fold K``: train one presence-classifier fold.

Uses the segmentation folds (``folds.csv``) and writes ``runs/<experiment>/classifier/
fold_<K>/``: ``best_weights.h5``, ``history.csv``, ``curves.png``, ``checkpoint/``
(resume), ``oof_cls.csv`` (each validation image's presence probability per class, with
the TTA views of ``tta.views``) and ``metrics.json`` (written last: the fold is finished).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from pipeline.classifier import (
    ImageSampler,
    build_classifier_from_config,
    classifier_fold_dir,
    copy_segmentation_encoder,
    make_presence_eval_dataset,
    make_presence_metrics,
    make_presence_train_dataset,
    predict_presence_tta,
    presence_labels,
)
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
from pipeline.data import ImageCache, build_augmentation, training_cache
from pipeline.devices import make_strategy, set_mixed_precision, split_cpu
from pipeline.experiment import (
    check_fold_number,
    check_trained_config,
    open_experiment,
    read_json,
    record_trained_config,
    write_json,
)
from pipeline.fold_jobs import FoldJob, FoldJobFailed
from pipeline.folds import classifier_skip_reason
from pipeline.inference import iter_batches
from pipeline.keras_backend import keras, tf
from pipeline.metrics import presence_confusion
from pipeline.optim import make_optimizer
from pipeline.run_lock import hold_lock
from pipeline.sample_order import first_sample
from pipeline.train import (
    _device_name,
    build_model,
    is_finished,
    run_parallel,
    seed_everything,
)
from pipeline.trainer import BEST_WEIGHTS, FitSettings, fit_resumable, load_best_weights

log = logging.getLogger(__name__)

METRICS = "metrics.json"
OOF = "oof_cls.csv"
PRESENCE_THRESHOLD = 0.5  # the operating point reported in metrics.json; the gate is tuned later


def classifier_fit_settings(config: Config) -> FitSettings:
    """FitSettings from ``classifier.*``, with ``train.tensorboard`` and ``train.verbose``."""
    c = config.classifier
    return FitSettings(
        epochs=int(c.epochs),
        monitor=c.monitor,
        monitor_mode=c.monitor_mode,
        reduce_lr_factor=c.reduce_lr_factor,
        reduce_lr_patience=c.reduce_lr_patience,
        min_lr=c.min_lr,
        early_stopping_patience=c.early_stopping_patience,
        tensorboard=config.train.tensorboard,
        verbose=config.train.verbose,
    )


def score_presence(truth: np.ndarray, prob: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Presence scores of (N, C) probabilities against (N, C) {0, 1} truth.

    Per-class ROC AUC (nan where a class has one label only) and their nan-mean; pooled
    and per-class accuracy, sensitivity and specificity at probability 0.5.
    """
    if truth.shape != prob.shape or truth.ndim != 2 or truth.shape[1] != len(classes):
        raise ValueError(
            f"truth and prob must both be (N, {len(classes)}); got {truth.shape} and {prob.shape}"
        )
    present = truth.astype(bool)
    predicted = prob >= PRESENCE_THRESHOLD
    auc = {
        name: float(roc_auc_score(present[:, c], prob[:, c]))
        if 0 < present[:, c].sum() < len(present)
        else float("nan")
        for c, name in enumerate(classes)
    }
    pooled = presence_confusion(present, predicted)
    per_class = {}
    for c, name in enumerate(classes):
        counts = presence_confusion(present[:, c], predicted[:, c])
        per_class[name] = {k: counts[k] for k in ("accuracy", "sensitivity", "specificity")}
    finite = [v for v in auc.values() if np.isfinite(v)]
    return {
        "oof_auc": float(np.mean(finite)) if finite else float("nan"),
        "oof_auc_per_class": auc,
        "oof_accuracy_050": pooled["accuracy"],
        "oof_sensitivity_050": pooled["sensitivity"],
        "oof_specificity_050": pooled["specificity"],
        "oof_per_class_050": per_class,
    }


def init_from_segmentation(config: Config, model: keras.Model, fold: int, n_classes: int) -> None:
    """Start the classifier's backbone from the encoder of segmentation fold ``fold``.

    The same fold, so the classifier's validation images stay unseen. A resumed run's
    checkpoint overrides these weights afterwards.
    """
    weights = config.fold_dir(fold) / BEST_WEIGHTS
    if config.model.backbone != config.classifier.backbone:
        raise ValueError(
            f"classifier.init_from_segmentation needs classifier.backbone == model.backbone; "
            f"got {config.classifier.backbone!r} and {config.model.backbone!r}"
        )
    if not weights.is_file():
        raise FileNotFoundError(
            f"classifier.init_from_segmentation needs {weights}: train segmentation fold "
            f"{fold} first (python -m pipeline.train --fold {fold})"
        )
    segmentation = build_model(config, n_classes)
    load_best_weights(segmentation, weights)
    copied = copy_segmentation_encoder(model, segmentation)
    log.info("classifier backbone: %d encoder layers copied from %s", copied, weights)


def _check_fold_start(fold: int, fold_dir: Path, resume: bool, force: bool) -> None:
    if is_finished(fold_dir) and not force:
        raise FileExistsError(
            f"classifier fold {fold} already finished ({fold_dir / METRICS}); pass --force"
        )
    if (fold_dir / "checkpoint").exists() and not (resume or force):
        raise FileExistsError(
            f"classifier fold {fold} has an interrupted run in {fold_dir}; pass --resume to "
            f"continue it or --force to start over"
        )


def train_classifier_fold(
    config: Config, fold: int, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """Train one classifier fold, predict its validation images, return and save metrics.

    Holds the fold's lock throughout (see ``train.train_fold``).
    """
    check_fold_number(config, fold)
    with hold_lock(classifier_fold_dir(config, fold), f"classifier fold {fold}"):
        return _train_classifier_fold(config, fold, resume, force)


def _train_classifier_fold(config: Config, fold: int, resume: bool, force: bool) -> dict[str, Any]:
    seed_everything(config.seed)
    fold_dir = classifier_fold_dir(config, fold)
    _check_fold_start(fold, fold_dir, resume, force)
    check_trained_config(config, force)
    exp = open_experiment(config)
    if force:
        (fold_dir / METRICS).unlink(missing_ok=True)
    c, t = config.classifier, config.train
    train_ids, val_ids = exp.members(fold)
    cache = training_cache(config, exp, c.image_size)
    record_trained_config(config, fold_dir)
    labels = presence_labels(exp.table, exp.classes, cache.image_ids)
    started = time.monotonic()
    mixed = set_mixed_precision(t.mixed_precision)
    strategy = make_strategy(t.strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch = c.batch_size * replicas
    steps = max(1, len(train_ids) // global_batch)
    log.info(
        "classifier fold %d: %d train / %d val images at %s; %d replica(s) x batch %d, "
        "%d accumulated; %d steps per epoch; training positives per class %s",
        fold,
        len(train_ids),
        len(val_ids),
        list(c.image_size),
        replicas,
        c.batch_size,
        c.accumulation_steps,
        steps,
        dict(
            zip(
                exp.classes,
                labels[cache.index_of(train_ids)].sum(axis=0).astype(int).tolist(),
                strict=True,
            )
        ),
    )
    sampler = ImageSampler(cache, build_augmentation(config.augment), config.seed)
    train_rows = cache.index_of(train_ids)

    def train_data(epoch: int) -> tf.data.Dataset:
        return make_presence_train_dataset(
            sampler,
            train_rows,
            labels,
            global_batch,
            config.seed + fold,
            t.num_parallel_calls,
            t.prefetch,
            start=first_sample(epoch, steps, global_batch),
        )

    val_ds = make_presence_eval_dataset(
        cache, cache.index_of(val_ids), labels, global_batch, replicas
    )
    with strategy.scope():
        model = build_classifier_from_config(config, len(exp.classes))
    if c.init_from_segmentation:
        init_from_segmentation(config, model, fold, len(exp.classes))

    def compile_phase(net: keras.Model, phase: int, lr: float) -> None:
        with strategy.scope():
            net.compile(
                optimizer=make_optimizer(lr, c.accumulation_steps),
                loss=keras.losses.BinaryCrossentropy(label_smoothing=c.label_smoothing),
                metrics=make_presence_metrics(len(exp.classes)),
            )

    state = fit_resumable(
        model,
        compile_phase,
        [],
        train_data,
        val_ds,
        steps,
        fold_dir,
        classifier_fit_settings(config),
        c.lr,
        resume,
    )
    train_time = time.monotonic() - started
    started = time.monotonic()
    oof = predict_oof_presence(config, model, cache, val_ids, exp.classes)
    write_oof(oof, fold_dir / OOF)
    rows = cache.index_of(val_ids)
    scores = score_presence(labels[rows], oof[exp.classes].to_numpy(), exp.classes)
    metrics = {
        "fold": fold,
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "backbone": c.backbone,
        "image_size": list(c.image_size),
        "best_epoch": state["best_epoch"],
        f"best_{c.monitor}": state["best_value"],
        "epochs_run": state["epoch"],
        **scores,
        "train_seconds": round(train_time, 1),
        "oof_seconds": round(time.monotonic() - started, 1),
        "device": _device_name(),
        "replicas": replicas,
        "mixed_precision": mixed,
    }
    write_json(fold_dir / METRICS, metrics)
    log.info("classifier fold %d finished: OOF AUC = %.4f", fold, scores["oof_auc"])
    return metrics


def predict_oof_presence(
    config: Config,
    model: keras.Model,
    cache: ImageCache,
    image_ids: Sequence[str],
    classes: Sequence[str],
) -> pd.DataFrame:
    """Presence probabilities of ``image_ids`` with the TTA views of config.

    Returns a frame: ``image_id`` then one float32 column per class, rows in the order of
    ``image_ids``.
    """
    rows = cache.index_of(image_ids)
    probs = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for batch in iter_batches(len(rows), config.tta.batch_size):
        images = np.asarray(cache.images[rows[batch]])
        probs[batch] = predict_presence_tta(model, images, config.tta.views)
    frame = pd.DataFrame(probs, columns=list(classes))
    frame.insert(0, "image_id", list(image_ids))
    return frame


def write_oof(frame: pd.DataFrame, path: Path) -> Path:
    """Write the OOF presence table atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, float_format="%.6f")
    os.replace(tmp, path)
    return path


def read_oof_presence(config: Config, folds: Sequence[int]) -> pd.DataFrame:
    """The ``oof_cls.csv`` of finished classifier folds, concatenated."""
    frames = []
    for fold in folds:
        path = classifier_fold_dir(config, fold) / OOF
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; train the classifier fold first: "
                f"python -m pipeline.train_classifier --fold {fold}"
            )
        frames.append(pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False))
    return pd.concat(frames, ignore_index=True)


def train_classifier_folds(
    config: Config, folds: Sequence[int], resume: bool = False, force: bool = False
) -> list[dict[str, Any]]:
    """Train several classifier folds; finished folds are skipped unless ``force``.

    One after the other in this process, or with ``train.parallel_folds`` > 1 as that
    many child processes at once.
    """
    for fold in folds:
        check_fold_number(config, fold)
    exp = open_experiment(config)
    reason = classifier_skip_reason(exp.table, exp.classes)
    if reason is not None:
        log.info("presence classifier skipped: %s", reason)
        return []
    pending = [k for k in folds if force or not is_finished(classifier_fold_dir(config, k))]
    if config.train.parallel_folds > 1 and len(pending) > 1:
        run_parallel(config, classifier_jobs(config, pending), resume, force)
        return [
            read_json(classifier_fold_dir(config, k) / METRICS, "train the classifier fold")
            for k in folds
        ]
    results = []
    for fold in folds:
        fold_dir = classifier_fold_dir(config, fold)
        if is_finished(fold_dir) and not force:
            log.info("classifier fold %d already finished (%s); skipping", fold, fold_dir / METRICS)
            results.append(
                read_json(fold_dir / METRICS, "train it: python -m pipeline.train_classifier")
            )
            continue
        results.append(train_classifier_fold(config, fold, resume=resume, force=force))
    return results


def classifier_jobs(config: Config, folds: Sequence[int]) -> list[FoldJob]:
    """Classifier fold jobs; each waits for its segmentation fold when it starts from
    that fold's encoder (``classifier.init_from_segmentation``)."""
    jobs = []
    for k in folds:
        after = (FoldJob("segmentation", k),) if config.classifier.init_from_segmentation else ()
        jobs.append(FoldJob("classifier", k, after))
    return jobs


def score_all_folds(config: Config, folds: Sequence[int]) -> dict[str, Any]:
    """Presence scores of the OOF probabilities of ``folds`` pooled together."""
    exp = open_experiment(config)
    oof = read_oof_presence(config, folds)
    truth = presence_labels(exp.table, exp.classes, oof["image_id"].tolist())
    return score_presence(truth, oof[exp.classes].to_numpy(), exp.classes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train_classifier", description=__doc__
    )
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
            folds = list(range(config.folds.n_splits)) if args.all else [args.fold]
            results = train_classifier_folds(config, folds, resume=args.resume, force=args.force)
            pooled = score_all_folds(config, folds) if len(results) > 1 else None
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    except FoldJobFailed as exc:
        log.error("%s\ncontinue with --resume once the cause is fixed", exc)
        return 1
    except KeyboardInterrupt:
        command = f"python -m pipeline.train_classifier --config {args.config} --all"
        return report_interrupt(command)
    for r in results:
        print(f"classifier fold {r['fold']}: OOF AUC = {r['oof_auc']:.4f}")
    if pooled is not None:
        per_class = ", ".join(f"{k} {v:.4f}" for k, v in pooled["oof_auc_per_class"].items())
        print(f"all {len(folds)} folds pooled: OOF AUC = {pooled['oof_auc']:.4f} ({per_class})")
    return 0


if __name__ == "__main__":
    exit_process(main())
