"""``python -m pipeline.train --fold K``: train one segmentation fold (or ``--all``).

Writes ``runs/<experiment>/fold_<K>/``: ``best_weights.h5``, ``history.csv``,
``curves.png``, ``checkpoint/`` (resume), ``oof/`` (validation probabilities at
submission size, uint8) and ``metrics.json`` (written last: the fold is finished).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.config import Config
from pipeline.core.exclusive import argmax_masks, is_exclusive, without_void
from pipeline.core.layout import OOF, OOF_PRESENCE
from pipeline.core.lr_range import resolve_lr
from pipeline.core.masks import resize_probs, truth_masks
from pipeline.core.metrics import kaggle_dice, score_presence
from pipeline.core.probstore import ProbWriter, dequantise_prob, quantise_prob
from pipeline.core.sample_order import batches_per_pass, first_sample
from pipeline.core.schedule import training_phases
from pipeline.nn import fold_trainer
from pipeline.nn.classifier import presence_labels
from pipeline.nn.data import CropSampler, build_augmentation, make_eval_dataset, make_train_dataset
from pipeline.nn.devices import split_cpu
from pipeline.nn.fold_trainer import FoldContext, FoldParts, FoldStage, fit_settings
from pipeline.nn.inference import iter_batches, predict_tta_outputs
from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.losses import segmentation_compile_args, with_presence_targets
from pipeline.nn.model import (
    build_model,
    check_input_size,
    encoder_layers,
    set_encoder_fraction,
)
from pipeline.nn.optim import make_optimizer
from pipeline.run.cluster import WORKER_KEY, worker_summary
from pipeline.run.command import Command, add_fold_arguments, config_from_args
from pipeline.run.experiment import Experiment, open_experiment, read_pseudo_labels
from pipeline.run.fold_jobs import FoldJob
from pipeline.run.image_cache import ImageCache, pseudo_label_cache, stack_caches, training_cache
from pipeline.run.oof import write_presence_oof
from pipeline.run.process import exit_process

log = logging.getLogger(__name__)


def check_inputs(config: Config) -> None:
    """Checked before any fold starts: the sizes suit the network's stride, and a
    pseudo-label table is readable and labels no training image."""
    check_sizes(config)
    if config.data.pseudo_labels is not None:
        read_pseudo_labels(config, open_experiment(config))


def check_sizes(config: Config) -> None:
    """The training crop and the validation input must suit the network's stride."""
    t = config.train
    check_input_size(t.crop_size, "train.crop_size")
    if t.val_crop is not None:
        check_input_size(t.val_crop, "train.val_crop")
    else:
        check_input_size(config.data.image_size, "data.image_size (validation input)")


def prepare(ctx: FoldContext) -> FoldParts:
    """One segmentation fold's data, model, compile step and OOF writer."""
    config, exp, fold = ctx.config, ctx.exp, ctx.fold
    t = config.train
    cache = training_cache(config, exp, config.data.image_size)
    train_rows = cache.index_of(ctx.train_ids)
    source = cache
    if config.data.pseudo_labels is not None:
        # Pseudo-labelled images join the training part only: never validation or OOF.
        pseudo = pseudo_label_cache(config, exp, config.data.image_size)
        source = stack_caches(cache, pseudo)
        extra = len(cache.image_ids) + np.arange(len(pseudo.image_ids))
        train_rows = np.concatenate([train_rows, extra])
        log.info("fold %d: + %d pseudo-labelled training images", fold, len(extra))
    global_batch = t.batch_size * ctx.replicas
    steps = t.steps_per_epoch or batches_per_pass(len(train_rows), global_batch)
    log.info(
        "fold %d: %d train / %d val images; %d replica(s) x batch %d, %d accumulated -> "
        "%d images per Adam step; %d steps per epoch",
        fold,
        len(train_rows),
        len(ctx.val_ids),
        ctx.replicas,
        t.batch_size,
        t.accumulation_steps,
        global_batch * t.accumulation_steps,
        steps,
    )
    exclusive = is_exclusive(config.model.activation)
    sampler = CropSampler(
        source, t.crop_size, build_augmentation(config.augment), config.seed, exclusive
    )

    def train_data(epoch: int) -> tf.data.Dataset:
        stream = make_train_dataset(
            sampler,
            train_rows,
            global_batch,
            config.seed + fold,
            t.num_parallel_calls,
            t.prefetch,
            start=first_sample(epoch, steps, global_batch),
        )
        return with_presence_targets(stream, model)

    val_ds = make_eval_dataset(
        cache, cache.index_of(ctx.val_ids), global_batch, t.val_crop, ctx.replicas, exclusive
    )
    fixed = t.crop_size if config.model.architecture == "PSPNet" else None
    with ctx.strategy.scope():
        model = build_model(config, len(exp.classes), fixed)
    val_ds = with_presence_targets(val_ds, model)
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
        with ctx.strategy.scope():
            decay = t.weight_decay or None
            optimizer = make_optimizer(lr, t.accumulation_steps, weight_decay=decay)
            if t.encoder_lr_factor != 1.0:
                encoder = [w for layer in encoder_layers(net) for w in layer.trainable_weights]
                optimizer.scale_lr(encoder, t.encoder_lr_factor)
            net.compile(
                optimizer=optimizer,
                **segmentation_compile_args(
                    net,
                    t.loss,
                    t.metric_threshold,
                    t.metric_min_area,
                    config.model.classification_head_weight,
                ),
            )

    def finish(net: keras.Model) -> dict[str, Any]:
        oof = predict_oof(config, exp, net, cache, ctx.val_ids, ctx.fold_dir / OOF)
        out = {
            "oof_kaggle_dice_050": oof["kaggle_dice"],
            "oof_kaggle_dice_050_per_class": oof["per_class"],
        }
        if oof["presence"] is None:
            # A head's table from an earlier training of this fold would now be stale.
            (ctx.fold_dir / OOF_PRESENCE).unlink(missing_ok=True)
        else:
            write_presence_oof(oof["presence"], ctx.fold_dir / OOF_PRESENCE)
            truth = presence_labels(exp.table, exp.classes, ctx.val_ids)
            out["presence_head"] = score_presence(
                truth, oof["presence"][exp.classes].to_numpy(), exp.classes
            )
        return out

    def calibration() -> Iterator[np.ndarray]:
        # The fold's own training images (not the pseudo-labelled ones) in a fixed
        # order, centre-cropped to the training input.
        height, width = cache.images.shape[1:3]
        ch, cw = (int(v) for v in t.crop_size)
        top, left = (height - ch) // 2, (width - cw) // 2
        rows = np.sort(cache.index_of(ctx.train_ids))
        full = max(1, len(rows) // t.batch_size) * t.batch_size
        for start in range(0, min(full, len(rows)), t.batch_size):
            batch = rows[start : start + t.batch_size]
            yield np.asarray(cache.images[batch, top : top + ch, left : left + cw])

    return FoldParts(
        model=model,
        compile_phase=compile_phase,
        train_data=train_data,
        val_ds=val_ds,
        steps=steps,
        settings=fit_settings(t),
        lr=resolve_lr(config),
        finish=finish,
        phases=phases,
        # An average of several epochs' weights needs statistics of its own.
        calibration=calibration if t.bn_recalibration or t.swa_top > 1 else None,
        # The copy's weights are replaced, so no pretrained encoder is read.
        build_plain=lambda: build_model(
            config.with_overrides(["model.encoder_weights=null"]), len(exp.classes), fixed
        ),
    )


def predict_oof(
    config: Config,
    exp: Experiment,
    model: keras.Model,
    cache: ImageCache,
    val_ids: Sequence[str],
    out_dir: Path,
) -> dict[str, Any]:
    """Predict the validation images (TTA from config) into a prob store at submission size.

    Returns the Kaggle Dice at threshold 0.5 (a softmax model: of the argmax masks, void
    pixels left out) against the truth at the same size, and
    with a presence head its probabilities (the mean over the views) as a frame
    ``image_id, <classes>`` in the order of ``val_ids`` (else None).
    """
    rows = cache.index_of(val_ids)
    rles = exp.rles()
    exclusive = is_exclusive(config.model.activation)
    size = config.data.submission_size
    scores, presence = [], []
    with ProbWriter(out_dir, exp.classes, overwrite=True) as writer:
        for batch in iter_batches(len(rows), config.tta.batch_size):
            idx = rows[batch]
            probs, head = predict_tta_outputs(
                model, np.asarray(cache.images[idx]), config.tta.views, config.tta.merge
            )
            if head is not None:
                presence.append(head)
            for i, prob in zip(idx, probs, strict=True):
                image_id = cache.image_ids[i]
                original = (int(cache.original_sizes[i][0]), int(cache.original_sizes[i][1]))
                target = size if size is not None else original
                q = quantise_prob(resize_probs(prob, target))
                writer.add(image_id, q)
                truth = truth_masks(rles[image_id], original, target)
                # Scored on the stored uint8 values, so the tuner's plain-0.5 score agrees.
                stored = dequantise_prob(q)[None]
                if exclusive:
                    void = exp.void.get(image_id)
                    void_mask = truth_masks([void], original, target)[..., 0] if void else None
                    truth = without_void(truth, void_mask)
                    stored = without_void(argmax_masks(stored), void_mask)
                scores.append(kaggle_dice(truth[None], stored, threshold=0.5)[0])
    per_image = np.stack(scores)  # (N, C)
    frame = None
    if presence:
        frame = pd.DataFrame(np.concatenate(presence), columns=list(exp.classes))
        frame.insert(0, "image_id", list(val_ids))
    return {
        "kaggle_dice": float(per_image.mean()),
        "per_class": dict(zip(exp.classes, per_image.mean(axis=0).round(6).tolist(), strict=True)),
        "presence": frame,
    }


def segmentation_jobs(config: Config, folds: Sequence[int]) -> list[FoldJob]:
    """One fold job per segmentation fold."""
    return [FoldJob("segmentation", k) for k in folds]


SEGMENTATION = FoldStage(
    label="segmentation fold",
    stage="train",
    fold_dir=lambda config, k: config.fold_dir(k),
    prepare=prepare,
    image_size=lambda config: config.data.image_size,
    jobs=segmentation_jobs,
    summary=lambda m: f"OOF Kaggle Dice at 0.5 = {m['oof_kaggle_dice_050']:.4f}",
    check=check_inputs,
)


def train_fold(
    config: Config, fold: int, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """Train one segmentation fold (``fold_trainer.train_fold``)."""
    return fold_trainer.train_fold(SEGMENTATION, config, fold, resume, force)


def train_folds(
    config: Config, folds: Sequence[int], resume: bool = False, force: bool = False
) -> list[dict[str, Any]]:
    """Train several segmentation folds (``fold_trainer.train_folds``)."""
    return fold_trainer.train_folds(SEGMENTATION, config, folds, resume, force)


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    split_cpu(args.logical_cpus)
    folds = range(config.folds.n_splits) if args.all else [args.fold]
    results = train_folds(config, list(folds), resume=args.resume, force=args.force)
    if any(WORKER_KEY in r for r in results):
        print(worker_summary(results))
        return 0
    for r in results:
        print(f"fold {r['fold']}: OOF Kaggle Dice at 0.5 = {r['oof_kaggle_dice_050']:.4f}")
    if len(results) > 1:
        mean = float(np.mean([r["oof_kaggle_dice_050"] for r in results]))
        print(f"mean over {len(results)} folds: {mean:.4f}")
    return 0


COMMAND = Command(
    stage="train",
    description=__doc__,
    add_arguments=add_fold_arguments,
    run=_run,
    examples=("--config configs/demo.yaml --fold 0", "--config configs/demo.yaml --all --resume"),
    resume="--all --resume",
)

main = COMMAND.main


if __name__ == "__main__":
    exit_process(main())
