"""``python -m pipeline.train_classifier --fold K``: train one presence-classifier fold.

Uses the segmentation folds (``folds.csv``) and writes ``runs/<experiment>/classifier/
fold_<K>/``: ``best_weights.h5``, ``history.csv``, ``curves.png``, ``checkpoint/``
(resume), ``oof_cls.csv`` (each validation image's presence probability per class, with
the TTA views of ``tta.views``) and ``metrics.json`` (written last: the fold is finished).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.folds import classifier_skip_reason
from pipeline.core.layout import BEST_WEIGHTS, CLASSIFIER_STAGE
from pipeline.core.layout import OOF_CLS as OOF
from pipeline.core.metrics import score_presence
from pipeline.core.sample_order import batches_per_pass, first_sample
from pipeline.nn import fold_trainer
from pipeline.nn.classifier import (
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
from pipeline.nn.data import build_augmentation
from pipeline.nn.devices import split_cpu
from pipeline.nn.fold_trainer import FoldContext, FoldParts, FoldStage, fit_settings
from pipeline.nn.inference import iter_batches
from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.model import build_model
from pipeline.nn.optim import make_optimizer
from pipeline.nn.weights import load_best_weights
from pipeline.run.cluster import WORKER_KEY, worker_summary
from pipeline.run.command import Command, add_fold_arguments, config_from_args
from pipeline.run.experiment import open_experiment
from pipeline.run.fold_jobs import FoldJob
from pipeline.run.fold_records import check_fold_number
from pipeline.run.image_cache import ImageCache, training_cache
from pipeline.run.oof import write_presence_oof
from pipeline.run.process import exit_process

log = logging.getLogger(__name__)


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
            f"{fold} first ({command_line('train', f'--fold {fold}', config=config.source)})"
        )
    segmentation = build_model(config, n_classes)
    load_best_weights(segmentation, weights)
    copied = copy_segmentation_encoder(model, segmentation)
    log.info("classifier backbone: %d encoder layers copied from %s", copied, weights)


def prepare(ctx: FoldContext) -> FoldParts:
    """One classifier fold's data, model, compile step and OOF writer."""
    config, exp, fold = ctx.config, ctx.exp, ctx.fold
    c, t = config.classifier, config.train
    cache = training_cache(config, exp, c.image_size)
    labels = presence_labels(exp.table, exp.classes, cache.image_ids)
    global_batch = c.batch_size * ctx.replicas
    steps = batches_per_pass(len(ctx.train_ids), global_batch)
    train_rows = cache.index_of(ctx.train_ids)
    log.info(
        "classifier fold %d: %d train / %d val images at %s; %d replica(s) x batch %d, "
        "%d accumulated; %d steps per epoch; training positives per class %s",
        fold,
        len(ctx.train_ids),
        len(ctx.val_ids),
        list(c.image_size),
        ctx.replicas,
        c.batch_size,
        c.accumulation_steps,
        steps,
        dict(zip(exp.classes, labels[train_rows].sum(axis=0).astype(int).tolist(), strict=True)),
    )
    sampler = ImageSampler(cache, build_augmentation(config.augment), config.seed)

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

    val_rows = cache.index_of(ctx.val_ids)
    val_ds = make_presence_eval_dataset(cache, val_rows, labels, global_batch, ctx.replicas)
    with ctx.strategy.scope():
        model = build_classifier_from_config(config, len(exp.classes))
    if c.init_from_segmentation:
        init_from_segmentation(config, model, fold, len(exp.classes))

    def compile_phase(net: keras.Model, phase: int, lr: float) -> None:
        with ctx.strategy.scope():
            net.compile(
                optimizer=make_optimizer(lr, c.accumulation_steps),
                loss=keras.losses.BinaryCrossentropy(label_smoothing=c.label_smoothing),
                metrics=make_presence_metrics(len(exp.classes)),
            )

    def finish(net: keras.Model) -> dict[str, Any]:
        oof = predict_oof_presence(config, net, cache, ctx.val_ids, exp.classes)
        write_presence_oof(oof, ctx.fold_dir / OOF)
        return score_presence(labels[val_rows], oof[exp.classes].to_numpy(), exp.classes)

    settings = fit_settings(c, tensorboard=t.tensorboard, verbose=t.verbose)
    return FoldParts(
        model=model,
        compile_phase=compile_phase,
        train_data=train_data,
        val_ds=val_ds,
        steps=steps,
        settings=settings,
        lr=c.lr,
        finish=finish,
        info={"backbone": c.backbone, "image_size": list(c.image_size)},
        # The copy's weights are replaced, so no pretrained file is read.
        build_plain=lambda: build_classifier_from_config(
            config.with_overrides(["classifier.weights=null"]), len(exp.classes)
        ),
    )


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


def read_oof_presence(config: Config, folds: Sequence[int]) -> pd.DataFrame:
    """The ``oof_cls.csv`` of finished classifier folds, concatenated."""
    frames = []
    for fold in folds:
        path = classifier_fold_dir(config, fold) / OOF
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; train the classifier fold first: "
                + command_line("train-classifier", f"--fold {fold}", config=config.source)
            )
        frames.append(pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False))
    return pd.concat(frames, ignore_index=True)


def classifier_jobs(config: Config, folds: Sequence[int]) -> list[FoldJob]:
    """Classifier fold jobs; each waits for its segmentation fold when it starts from
    that fold's encoder (``classifier.init_from_segmentation``)."""
    jobs = []
    for k in folds:
        after = (FoldJob("segmentation", k),) if config.classifier.init_from_segmentation else ()
        jobs.append(FoldJob(CLASSIFIER_STAGE, k, after))
    return jobs


CLASSIFIER = FoldStage(
    label="classifier fold",
    stage="train-classifier",
    fold_dir=classifier_fold_dir,
    prepare=prepare,
    image_size=lambda config: config.classifier.image_size,
    jobs=classifier_jobs,
    summary=lambda m: f"OOF AUC = {m['oof_auc']:.4f}",
)


def train_classifier_fold(
    config: Config, fold: int, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """Train one classifier fold (``fold_trainer.train_fold``)."""
    return fold_trainer.train_fold(CLASSIFIER, config, fold, resume, force)


def train_classifier_folds(
    config: Config, folds: Sequence[int], resume: bool = False, force: bool = False
) -> list[dict[str, Any]]:
    """Train several classifier folds; none when the classifier has nothing to learn
    (``folds.classifier_skip_reason``). Finished folds are skipped unless ``force``."""
    for fold in folds:
        check_fold_number(config, fold)
    exp = open_experiment(config)
    reason = classifier_skip_reason(exp.table, exp.classes)
    if reason is not None:
        log.info("presence classifier skipped: %s", reason)
        return []
    return fold_trainer.train_folds(CLASSIFIER, config, folds, resume, force)


def score_all_folds(config: Config, folds: Sequence[int]) -> dict[str, Any]:
    """Presence scores of the OOF probabilities of ``folds`` pooled together."""
    exp = open_experiment(config)
    oof = read_oof_presence(config, folds)
    truth = presence_labels(exp.table, exp.classes, oof["image_id"].tolist())
    return score_presence(truth, oof[exp.classes].to_numpy(), exp.classes)


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    split_cpu(args.logical_cpus)
    folds = list(range(config.folds.n_splits)) if args.all else [args.fold]
    results = train_classifier_folds(config, folds, resume=args.resume, force=args.force)
    if any(WORKER_KEY in r for r in results):
        print(worker_summary(results))
        return 0
    for r in results:
        print(f"classifier fold {r['fold']}: OOF AUC = {r['oof_auc']:.4f}")
    if len(results) > 1:
        pooled = score_all_folds(config, folds)
        per_class = ", ".join(f"{k} {v:.4f}" for k, v in pooled["oof_auc_per_class"].items())
        print(f"all {len(folds)} folds pooled: OOF AUC = {pooled['oof_auc']:.4f} ({per_class})")
    return 0


COMMAND = Command(
    stage="train-classifier",
    description=__doc__,
    add_arguments=add_fold_arguments,
    run=_run,
    examples=("--config configs/demo.yaml --fold 0", "--config configs/demo.yaml --all --resume"),
    resume="--all --resume",
)

main = COMMAND.main


if __name__ == "__main__":
    exit_process(main())
