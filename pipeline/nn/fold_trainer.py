"""The one fold trainer and the one ``--all`` runner, for every model trained per fold.

The segmentation model (``pipeline.train``) and the presence classifier
(``pipeline.train_classifier``) train the same way: hold the fold's lock, refuse to
overwrite a finished fold or an interrupted one, check the trained settings, build the
data and the model, ``trainer.fit_resumable``, write the fold's OOF predictions, then
``metrics.json`` last. What differs is passed in as a ``FoldStage``: where the fold
lives, how its data, model and OOF writer are made (``FoldStage.prepare``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.layout import BEST_WEIGHTS, CHECKPOINT, FOLD_METRICS, SWA
from pipeline.core.schedule import Phase
from pipeline.core.schema import FitConfig, TrainConfig
from pipeline.nn.batchnorm import recalibrate_copy
from pipeline.nn.checkpoint import load_state
from pipeline.nn.devices import (
    check_strategy,
    device_name,
    inference_precision,
    make_strategy,
    precision_policy,
    seed_everything,
    set_mixed_precision,
)
from pipeline.nn.keras_backend import check_framework, keras, tf
from pipeline.nn.trainer import FitSettings, fit_resumable
from pipeline.nn.weights import copy_model, save_weights_atomic
from pipeline.run.cluster import WORKER_DIR_ENV, WORKER_KEY, WorkerRole, worker_role
from pipeline.run.experiment import Experiment, open_experiment
from pipeline.run.fold_jobs import FoldJob, run_fold_jobs, use_fold_jobs
from pipeline.run.fold_records import (
    check_fold_number,
    check_trained_config,
    is_finished,
    read_fold_metrics,
    record_trained_config,
)
from pipeline.run.image_cache import training_cache
from pipeline.run.json_files import write_json
from pipeline.run.run_lock import hold_lock
from pipeline.run.tracker import NULL_TRACKER, Tracker
from pipeline.run.tracking import open_tracker, record_config, record_fold

log = logging.getLogger(__name__)


def fit_settings(section: FitConfig, epochs: int | None = None, **overrides: Any) -> FitSettings:
    """FitSettings from a fitted section (``train`` or ``classifier``); ``overrides``
    replace fields. The segmenter's own keys (progress output, weight averaging) come
    from ``train``; the classifier takes their defaults unless overridden."""
    values: dict[str, Any] = {
        "epochs": epochs if epochs is not None else section.epochs,
        "monitor": section.monitor,
        "monitor_mode": section.monitor_mode,
        "reduce_lr_factor": section.reduce_lr_factor,
        "reduce_lr_patience": section.reduce_lr_patience,
        "min_lr": section.min_lr,
        "early_stopping_patience": section.early_stopping_patience,
    }
    if isinstance(section, TrainConfig):
        values |= {
            "tensorboard": section.tensorboard,
            "verbose": section.verbose,
            "ema_decay": section.ema_decay,
            "swa_top": section.swa_top,
            "swa_select": section.swa_select,
        }
    values.update(overrides)
    return FitSettings(**values)


@dataclass
class FoldParts:
    """What ``FoldStage.prepare`` builds for one fold: data, model and how to finish.

    ``finish(model)`` predicts and writes the fold's OOF output and returns its entries
    of ``metrics.json``; ``info`` holds entries written before the training figures.
    ``calibration()``, when set, yields the training batches that re-estimate the
    BatchNorm statistics of the best weights before ``finish`` (``nn.batchnorm``), on a
    plain copy made by ``build_plain()``.
    """

    model: keras.Model
    compile_phase: Callable[[keras.Model, int, float], None]
    train_data: Callable[[int], tf.data.Dataset]
    val_ds: tf.data.Dataset
    steps: int
    settings: FitSettings
    lr: float
    finish: Callable[[keras.Model], dict[str, Any]]
    phases: Sequence[int | Phase] = ()
    info: dict[str, Any] = field(default_factory=dict)
    calibration: Callable[[], Iterable[np.ndarray]] | None = None
    build_plain: Callable[[], keras.Model] | None = None


@dataclass(frozen=True)
class FoldContext:
    """One fold's inputs to ``FoldStage.prepare``."""

    config: Config
    exp: Experiment
    fold: int
    fold_dir: Path
    train_ids: list[str]
    val_ids: list[str]
    strategy: tf.distribute.Strategy

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


@dataclass(frozen=True)
class FoldStage:
    """A model trained per fold (``label`` names it in messages, ``stage`` is its command:
    ``train`` or ``train-classifier``).

    ``fold_dir(config, k)``: where fold k lives. ``check(config)``: input checks made
    before anything is written. ``prepare(context)``: the fold's ``FoldParts``.
    ``image_size(config)``: the cache size its data uses (made before parallel jobs).
    ``jobs(config, folds)``: its fold jobs for ``train.parallel_folds``.
    ``summary(metrics)``: the log line of a finished fold.
    """

    label: str
    stage: str
    fold_dir: Callable[[Config, int], Path]
    prepare: Callable[[FoldContext], FoldParts]
    image_size: Callable[[Config], Sequence[int]]
    jobs: Callable[[Config, Sequence[int]], list[FoldJob]]
    summary: Callable[[dict[str, Any]], str]
    check: Callable[[Config], None] = lambda config: None


def train_fold(
    stage: FoldStage, config: Config, fold: int, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """Train one fold of ``stage``, write its OOF output; return and save its metrics.

    The fold's lock (``run_lock``) is held throughout: a second trainer of the same
    fold, here or on another machine sharing the runs directory, is refused. Under
    ``train.strategy: multi_worker`` only the chief holds it and writes the fold's files;
    every other worker trains alongside and writes its copies to a scratch directory
    (``cluster.WORKER_DIR_ENV``, else a temporary one removed at the end).
    """
    check_fold_number(config, fold)
    check_framework(str(config.framework), config.source or "the config")
    check_strategy(config.train.strategy)
    fold_dir = stage.fold_dir(config, fold)
    role = worker_role(os.environ) if config.train.strategy == "multi_worker" else None
    if role is not None and not role.is_chief:
        kept = os.environ.get(WORKER_DIR_ENV)
        if kept:
            scratch = Path(kept) / fold_dir.name
            scratch.mkdir(parents=True, exist_ok=True)
            return _train_fold(stage, config, fold, fold_dir, resume, force, role, scratch)
        with tempfile.TemporaryDirectory(prefix=f"foldseg-{role.task_type}{role.index}-") as tmp:
            return _train_fold(stage, config, fold, fold_dir, resume, force, role, Path(tmp))
    with hold_lock(fold_dir, f"{stage.label} {fold}"):
        return _train_fold(stage, config, fold, fold_dir, resume, force, role, fold_dir)


def _train_fold(
    stage: FoldStage,
    config: Config,
    fold: int,
    fold_dir: Path,
    resume: bool,
    force: bool,
    role: WorkerRole | None,
    out_dir: Path,
) -> dict[str, Any]:
    """Train in ``out_dir`` (``fold_dir``, or a non-chief worker's scratch directory)."""
    seed_everything(config.seed)
    # MultiWorkerMirroredStrategy must exist before TensorFlow runs any op.
    strategy = make_strategy(config.train.strategy)
    if is_finished(fold_dir) and not force:
        raise FileExistsError(
            f"{stage.label} {fold} already finished ({fold_dir / FOLD_METRICS}); pass --force"
        )
    if (fold_dir / CHECKPOINT).exists() and not (resume or force):
        raise FileExistsError(
            f"{stage.label} {fold} has an interrupted run in {fold_dir}; pass --resume to "
            f"continue it or --force to start over"
        )
    if resume:
        load_state(fold_dir)  # a damaged checkpoint state is reported before anything is written
        if out_dir != fold_dir:
            _copy_resume_state(fold_dir, out_dir)
    stage.check(config)
    check_trained_config(config, force)
    exp = open_experiment(config)
    train_ids, val_ids = exp.members(fold)
    training_cache(config, exp, stage.image_size(config))  # built before the clock starts
    started = time.monotonic()
    mixed = set_mixed_precision(config.train.mixed_precision)
    context = FoldContext(config, exp, fold, out_dir, train_ids, val_ids, strategy)
    parts = stage.prepare(context)
    # Past every input check: only now is a finished fold's record replaced.
    if force and out_dir == fold_dir:
        (fold_dir / FOLD_METRICS).unlink(missing_ok=True)
    tracker, fold_run = NULL_TRACKER, NULL_TRACKER
    if out_dir == fold_dir:  # a non-chief worker writes nothing shared
        record_trained_config(config, fold_dir)
        tracker = open_tracker(config)
        record_config(tracker, config)
        fold_run = tracker.fold(_tracking_name(stage), fold, fold_dir, resume=resume)
    try:
        metrics = _fit(stage, context, parts, resume, role, started, mixed, fold_run)
    except BaseException:
        fold_run.finish(failed=True)
        tracker.finish()
        raise
    if WORKER_KEY not in metrics:
        record_fold(tracker, _tracking_name(stage), fold, fold_dir, fold_run)
    tracker.finish()
    return metrics


def _tracking_name(stage: FoldStage) -> str:
    """The fold's kind in the experiment tracker: segmentation or classifier."""
    return "classifier" if stage.stage == "train-classifier" else "segmentation"


def _fit(
    stage: FoldStage,
    context: FoldContext,
    parts: FoldParts,
    resume: bool,
    role: WorkerRole | None,
    started: float,
    mixed: str | None,
    fold_run: Tracker,
) -> dict[str, Any]:
    """Train in ``context.fold_dir``, then (the chief) predict the OOF images and write
    ``metrics.json``; each epoch goes to ``fold_run`` as it completes."""
    config, fold, out_dir = context.config, context.fold, context.fold_dir
    fold_dir = stage.fold_dir(config, fold)
    state = fit_resumable(
        parts.model,
        parts.compile_phase,
        parts.phases,
        parts.train_data,
        parts.val_ds,
        parts.steps,
        out_dir,
        parts.settings,
        parts.lr,
        resume,
        on_epoch=lambda row: fold_run.log_history([row]),
    )
    train_time = time.monotonic() - started
    started = time.monotonic()
    model = parts.model
    if role is not None and parts.build_plain is not None:
        # Inference on this worker alone: a plain copy, outside the cluster's collectives.
        model = copy_model(parts.model, parts.build_plain)
    recalibrated = {}
    if parts.calibration is not None and parts.build_plain is not None:
        used = recalibrate_copy(model, parts.build_plain, parts.calibration())
        save_weights_atomic(model, out_dir / BEST_WEIGHTS)
        log.info("%s %d: BatchNorm statistics re-estimated on %d batches", stage.label, fold, used)
        recalibrated = {
            "bn_recalibration_batches": used,
            "bn_recalibration_seconds": round(time.monotonic() - started, 1),
        }
        started = time.monotonic()
    if role is not None and not role.is_chief:
        log.info(
            "%s %d: %s done; the chief writes the fold's outputs", stage.label, fold, role.name
        )
        return {"fold": fold, WORKER_KEY: role.name, "best_epoch": state["best_epoch"]}
    precision = inference_precision(config.predict.precision)
    # The OOF is predicted as predict will predict the test images: at ``precision``, not
    # under the training policy (a mixed one included).
    if (precision != "float32" or mixed) and parts.build_plain is not None:
        with precision_policy(precision):
            model = copy_model(model, parts.build_plain)
    outputs = parts.finish(model)
    metrics = {
        "fold": fold,
        "n_train": len(context.train_ids),
        "n_val": len(context.val_ids),
        **parts.info,
        "best_epoch": state["best_epoch"],
        f"best_{parts.settings.monitor}": state["best_value"],
        "epochs_run": state["epoch"],
        **({"swa_epochs": state["swa_epochs"]} if "swa_epochs" in state else {}),
        **outputs,
        **recalibrated,
        "train_seconds": round(train_time, 1),
        "oof_seconds": round(time.monotonic() - started, 1),
        "device": device_name(),
        "replicas": context.replicas,
        "workers": role.n_workers if role is not None else 1,
        "mixed_precision": mixed,
        "inference_precision": precision,
    }
    write_json(fold_dir / FOLD_METRICS, metrics)
    log.info("%s %d finished: %s", stage.label, fold, stage.summary(metrics))
    return metrics


def _copy_resume_state(fold_dir: Path, out_dir: Path) -> None:
    """A non-chief worker resumes from the chief's last checkpoint, best weights and
    kept epochs (``train.swa_top``)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        if (fold_dir / name).is_dir():
            shutil.rmtree(out_dir / name, ignore_errors=True)
            shutil.copytree(fold_dir / name, out_dir / name)
            break
    if (fold_dir / BEST_WEIGHTS).is_file():
        shutil.copy2(fold_dir / BEST_WEIGHTS, out_dir / BEST_WEIGHTS)
    if (fold_dir / SWA).is_dir():
        shutil.rmtree(out_dir / SWA, ignore_errors=True)
        shutil.copytree(fold_dir / SWA, out_dir / SWA)


def run_parallel(
    config: Config,
    jobs: Sequence[FoldJob],
    sizes: Sequence[Sequence[int]],
    resume: bool,
    force: bool,
) -> None:
    """Run fold jobs on ``jobs.executor`` (locally ``train.parallel_folds`` at once).

    The split and the image caches (at ``sizes``) the jobs read are made here first, so
    that no two children make them at the same time.
    """
    exp = open_experiment(config)
    for job in jobs:
        exp.check_fold(job.fold)
    for size in sorted({tuple(int(v) for v in s) for s in sizes}):
        training_cache(config, exp, size)
    # The experiment's tracking run exists before the jobs look for it: none makes a second.
    open_tracker(config).finish()
    run_fold_jobs(config, jobs, config.train.parallel_folds, resume=resume, force=force)


def train_folds(
    stage: FoldStage,
    config: Config,
    folds: Sequence[int],
    resume: bool = False,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Train several folds of ``stage``; finished folds are skipped unless ``force``.

    One after the other in this process, or as fold jobs (``use_fold_jobs``): with
    ``train.parallel_folds`` > 1 that many child processes at once, or Ray tasks.
    """
    for fold in folds:
        check_fold_number(config, fold)
    pending = [k for k in folds if force or not is_finished(stage.fold_dir(config, k))]
    if len(folds) > 1 and use_fold_jobs(config, len(pending)):
        stage.check(config)  # here, before any job starts: a bad input is exit 2, not a job's
        run_parallel(config, stage.jobs(config, pending), [stage.image_size(config)], resume, force)
        return [
            read_fold_metrics(stage.fold_dir(config, k), _command(stage, config)) for k in folds
        ]
    results = []
    for fold in folds:
        fold_dir = stage.fold_dir(config, fold)
        if is_finished(fold_dir) and not force:
            log.info("%s %d already finished (%s); skipping", stage.label, fold, fold_dir)
            results.append(read_fold_metrics(fold_dir, _command(stage, config)))
            continue
        results.append(train_fold(stage, config, fold, resume=resume, force=force))
    return results


def _command(stage: FoldStage, config: Config) -> str:
    """The command that trains every fold of ``stage`` again (for messages)."""
    return command_line(stage.stage, "--all", config=config.source)
