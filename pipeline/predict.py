"""``python -m pipeline.predict``: folds x TTA -> classifier gate -> post-processing -> CSV.

The test images are cached once at ``data.image_size``. One model is built and given
each fold's ``best_weights.h5`` in turn; every batch of ``tta.batch_size`` images goes
through the network once per fold with all its TTA views (``inference.predict_tta``).
The folds are merged (``tta.merge``) in a memory-mapped fixed-point array under the run
directory (``FoldAccumulator``), so memory does not grow with the number of images.
Each merged prob is resized to the submission size, quantised to uint8 exactly like the
out-of-fold store the post-processing was tuned on, post-processed and RLE-encoded.

Writes ``submissions/<experiment>_<yyyymmdd-hhmm>.csv`` (validated, atomic), a row in
``submissions/history.md`` and ``runs/<experiment>/predict.json`` (timings).
``--no-postprocess`` uses threshold 0.5 for every class instead of ``postprocess.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from pipeline.core import rle, submission, submission_check
from pipeline.core.config import Config
from pipeline.core.formats import read_masks
from pipeline.core.images import (
    IMAGE_EXTENSIONS,
    files_fingerprint,
    folder_image_ids,
    list_image_files,
    resolve_image_path,
)
from pipeline.core.layout import FOLD_MERGE, POSTPROCESS, SUBMISSION_LOG
from pipeline.core.layout import FOLD_METRICS as METRICS
from pipeline.core.layout import PREDICT as PREDICT_JSON
from pipeline.core.layout import PREDICT_WORK as WORK_DIR
from pipeline.core.masks import resize_probs
from pipeline.core.postprocess import PostprocessParams, load_postprocess
from pipeline.core.probstore import QUANTISATION, quantise_prob
from pipeline.core.tta import GMEAN_EPS, MERGES
from pipeline.nn.classifier import STAGE as CLASSIFIER_STAGE
from pipeline.nn.classifier import build_classifier_from_config, predict_presence_tta
from pipeline.nn.data import ImageCache, build_cache
from pipeline.nn.devices import set_mixed_precision
from pipeline.nn.fold_trainer import device_name as describe_device
from pipeline.nn.fold_trainer import read_fold_metrics as read_metrics
from pipeline.nn.inference import iter_batches, predict_tta
from pipeline.nn.keras_backend import keras
from pipeline.nn.model import build_model, check_input_size
from pipeline.nn.trainer import BEST_WEIGHTS as WEIGHTS
from pipeline.nn.trainer import load_best_weights
from pipeline.run.cli import (
    add_config_arguments,
    add_force_argument,
    config_from_args,
    report_interrupted,
    setup_logging,
)
from pipeline.run.experiment import (
    Experiment,
    check_trained_config,
    open_experiment,
    read_json,
    write_json,
)
from pipeline.run.run_lock import hold_lock

log = logging.getLogger(__name__)

# The fold merge may be off the float merge by at most a quarter of a uint8 level, so
# quantising it gives the float result's level or a neighbour (only at a level's edge).
MERGE_TOLERANCE = 0.25 / QUANTISATION
# JPEG decoding and resizing release the GIL: one thread per core (3,698 Clouds test
# images of 1400x2100 take minutes on two).
CACHE_WORKERS = os.cpu_count() or 2
# Largest -log(p) a geometric mean sees: probs are floored at GMEAN_EPS.
LOG_SPAN = -math.log(GMEAN_EPS)


class FoldAccumulator:
    """Running merge over folds of probs (N, H, W, C), kept on disk as fixed-point codes.

    Per fold, ``add`` turns a batch of float probs into integer codes and folds them in:
    sums of ``round(p * scale)`` (``mean``), sums of ``round(-log(max(p, eps)) * scale)``
    (``gmean``, eps = ``tta.GMEAN_EPS`` as in ``tta.merge_arrays``) or maxima of
    ``round(p * scale)`` (``max``). The codes live in a memory-mapped uint16 array (uint32
    when 16 bits cannot keep ``max_error`` under ``MERGE_TOLERANCE``): half the bytes of
    float32, which at Clouds scale (3,698 x 384 x 576 x 4) is 6.5 GB on disk instead of
    13 GB, and never all in RAM. ``scale`` is chosen so that no sum can overflow.
    """

    def __init__(self, path: Path, shape: Sequence[int], n_folds: int, how: str = "mean") -> None:
        if how not in MERGES:
            raise ValueError(f"how must be one of {', '.join(MERGES)}; got {how!r}")
        if n_folds < 1:
            raise ValueError(f"n_folds must be at least 1; got {n_folds}")
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"shape must be (N, H, W, C) positive; got {tuple(shape)}")
        self.path = Path(path)
        self.n_folds = n_folds
        self.how = how
        terms = 1 if how == "max" else n_folds
        span = LOG_SPAN if how == "gmean" else 1.0
        for dtype in (np.uint16, np.uint32):
            # Each code is at most cap, so `terms` codes sum to at most iinfo.max.
            self.cap = int(np.iinfo(dtype).max) // terms
            self.scale = math.floor(self.cap / span)
            self.dtype = np.dtype(dtype)
            if self.max_error <= MERGE_TOLERANCE:
                break
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._codes = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=self.dtype, shape=tuple(int(s) for s in shape)
        )
        self._added = np.zeros(int(shape[0]), dtype=np.int64)

    @property
    def max_error(self) -> float:
        """Bound on |merged prob - ``tta.merge_arrays`` of the same probs|."""
        half_step = 0.5 / self.scale
        return math.expm1(half_step) if self.how == "gmean" else half_step

    def add(self, start: int, probs: np.ndarray) -> None:
        """Fold in one fold's probs (B, H, W, C) float in [0, 1] of images start..start+B-1."""
        stop = start + len(probs)
        if probs.shape[1:] != self._codes.shape[1:] or not 0 <= start < stop <= len(self._added):
            raise ValueError(
                f"probs of images {start}..{stop - 1} must be (B, "
                f"{', '.join(map(str, self._codes.shape[1:]))}) within {len(self._added)} "
                f"images; got {probs.shape}"
            )
        if (self._added[start:stop] >= self.n_folds).any():
            raise ValueError(
                f"images {start}..{stop - 1} already hold all {self.n_folds} folds; "
                "cannot add another"
            )
        values = probs.astype(np.float32, copy=False)
        if self.how == "gmean":
            values = -np.log(np.maximum(values, np.float32(GMEAN_EPS)))
        codes = np.rint(values * np.float32(self.scale))
        # float32 rounding of -log(eps) may land one step past cap; clip keeps sums safe.
        np.clip(codes, 0, self.cap, out=codes)
        target = self._codes[start:stop]
        if self.how == "max":
            np.maximum(target, codes.astype(self.dtype), out=target)
        else:
            target += codes.astype(self.dtype)
        self._added[start:stop] += 1

    def merged(self, start: int, stop: int) -> np.ndarray:
        """The merge over all folds of images start..stop-1: (B, H, W, C) float32 in [0, 1]."""
        missing = np.flatnonzero(self._added[start:stop] != self.n_folds)
        if missing.size:
            row = start + int(missing[0])
            raise ValueError(
                f"image {row} holds {self._added[row]} of {self.n_folds} folds; "
                "predict every fold before merging"
            )
        codes = self._codes[start:stop].astype(np.float32)
        if self.how == "max":
            return codes / np.float32(self.scale)
        mean = codes / np.float32(self.scale * self.n_folds)
        return np.exp(-mean) if self.how == "gmean" else np.minimum(mean, np.float32(1.0))

    def close(self) -> None:
        """Drop the memory map and delete its file."""
        del self._codes
        self.path.unlink(missing_ok=True)


class StageClock:
    """Wall and process CPU seconds per named stage, summed over repeated entries.

    CPU time (all threads of the process) tells overhead apart from waiting for the
    cores on a shared machine, where wall times swing with other processes' load.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block and add it to ``seconds[name]`` and ``cpu_seconds[name]``."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - wall
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu


def list_test_images(config: Config, exp: Experiment) -> list[str]:
    """Test image ids: those the sample submission lists, else every image file of
    ``data.test_images`` (sorted), spelled as the training CSV names its images."""
    data = config.data
    if data.sample_submission is not None:
        sample = read_masks(
            data.sample_submission,
            layout=exp.layout,
            classes=exp.classes,
            instance_class=data.instance_class,
        )
        ids = sorted(sample.table["image_id"].unique())
        _check_sample_images(data.sample_submission, Path(data.test_images), ids)
        return ids
    folder = Path(data.test_images)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.test_images folder {str(folder)!r} does not exist")
    # Spelled as the training CSV spells its images: file names, or bare stems (DSB).
    ids = folder_image_ids(folder, exp.image_ids)
    if not ids:
        raise FileNotFoundError(
            f"data.test_images folder {str(folder)!r} holds no image files "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    return ids


def _check_sample_images(sample: str, folder: Path, image_ids: Sequence[str]) -> None:
    """Every image the sample submission lists must be in the test folder (checked
    before any model is loaded)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data.test_images folder {str(folder)!r} does not exist")
    missing = []
    for image_id in image_ids:
        try:
            resolve_image_path(folder, image_id)
        except FileNotFoundError:
            missing.append(image_id)
    if missing:
        raise FileNotFoundError(
            f"sample submission {sample!r} lists {len(missing)} image(s) that the test folder "
            f"{str(folder)!r} lacks, e.g. {missing[:3]}; data.sample_submission and "
            f"data.test_images must describe the same test set"
        )


def fold_weights(config: Config, stage: str = "") -> list[Path]:
    """``best_weights.h5`` of every finished fold of a stage ("" segmentation, or
    ``classifier``); FileNotFoundError names the first missing one and its command."""
    command = "python -m pipeline.train_classifier" if stage else "python -m pipeline.train"
    paths = []
    for fold in range(config.folds.n_splits):
        fold_dir = config.fold_dir(fold, stage)
        hint = (
            f"train it: {command} --config {config.source or '<config>'} --fold {fold} "
            "(with the same --set overrides)"
        )
        if not (fold_dir / WEIGHTS).is_file():
            raise FileNotFoundError(f"fold {fold} has no weights {fold_dir / WEIGHTS}; {hint}")
        if not (fold_dir / METRICS).is_file():
            raise FileNotFoundError(
                f"fold {fold} has not finished training (no {fold_dir / METRICS}); {hint} --resume"
            )
        try:  # a truncated file is found here, before any image is read or model built
            h5py.File(fold_dir / WEIGHTS, "r").close()
        except OSError as exc:
            raise ValueError(
                f"weights file {fold_dir / WEIGHTS} is damaged ({exc}); retrain its fold "
                f"with --force"
            ) from None
        paths.append(fold_dir / WEIGHTS)
    return paths


def read_postprocess(
    config: Config, classes: Sequence[str], use_postprocess: bool
) -> tuple[dict[str, PostprocessParams], float, float | None]:
    """Per-class post-processing and the OOF scores it reaches: in-sample and nested.

    From ``postprocess.json`` (``extra.scores.tuned``: tuned and scored on the same OOF
    images; ``tuned_nested``: each fold scored with settings tuned on the others, None
    in a file from before it existed), or with ``use_postprocess`` False threshold 0.5
    everywhere and the folds' OOF Kaggle Dice at 0.5 (nothing tuned: both the same).
    """
    if not use_postprocess:
        metrics = [read_metrics(config.fold_dir(k)) for k in range(config.folds.n_splits)]
        for k, m in enumerate(metrics):
            if not isinstance(m.get("n_val"), int) or not isinstance(
                m.get("oof_kaggle_dice_050"), (int, float)
            ):
                raise ValueError(
                    f"{config.fold_dir(k) / METRICS} lacks n_val or oof_kaggle_dice_050 "
                    f"(damaged, or from another version); retrain the fold with --force"
                )
        n_val = sum(m["n_val"] for m in metrics)
        oof = sum(m["oof_kaggle_dice_050"] * m["n_val"] for m in metrics) / n_val
        return {name: PostprocessParams(threshold=0.5, min_area=0) for name in classes}, oof, oof
    path = config.run_dir / POSTPROCESS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: tune the post-processing first (python -m pipeline.tune "
            f"--config {config.source or '<config>'}), or pass --no-postprocess for "
            "threshold 0.5"
        )
    params, extra = load_postprocess(path, classes)
    scores = extra.get("scores")
    if not isinstance(scores, Mapping) or not isinstance(scores.get("tuned"), (int, float)):
        raise ValueError(f"{path}: extra.scores.tuned must hold the tuned OOF score; got {scores}")
    size = config.data.submission_size
    expected = list(size) if size is not None else "each image's own size"
    if "size" in extra and extra["size"] != expected:
        raise ValueError(
            f"{path} was tuned at submission size {extra['size']}, but data.submission_size "
            f"is now {expected}: its minimum areas are in pixels of the tuned size; tune "
            f"again or predict with --no-postprocess"
        )
    nested = scores.get("tuned_nested")
    return params, float(scores["tuned"]), float(nested) if nested is not None else None


def predict_folds(
    model: keras.Model,
    weights: Sequence[Path],
    images: np.ndarray,
    views: Sequence[str],
    how: str,
    batch_size: int,
    accumulator: FoldAccumulator,
    clock: StageClock,
) -> None:
    """Every fold's TTA prediction of ``images`` (N, H, W, 3) uint8, merged into ``accumulator``.

    Folds outer, batches inner: each fold's weights are loaded once.
    """
    for fold, path in enumerate(weights):
        with clock.stage("load_weights"):
            load_best_weights(model, path)
        started = time.perf_counter()
        for batch in iter_batches(len(images), batch_size):
            start, stop = int(batch[0]), int(batch[-1]) + 1
            with clock.stage("network"):
                probs = predict_tta(model, np.asarray(images[start:stop]), views, how)
            with clock.stage("accumulate"):
                accumulator.add(start, probs)
        rate = len(images) / max(time.perf_counter() - started, 1e-9)
        log.info("fold %d: %d images predicted (%.2f images/s)", fold, len(images), rate)


def predict_presence(
    config: Config, image_ids: Sequence[str], n_classes: int, cache_dir: Path, clock: StageClock
) -> np.ndarray:
    """Classifier presence probabilities (N, C) float32, the mean over its folds."""
    weights = fold_weights(config, CLASSIFIER_STAGE)
    with clock.stage("cache"):
        cache = build_cache(
            cache_dir,
            "test",
            Path(config.data.test_images),
            image_ids,
            config.classifier.image_size,
            workers=CACHE_WORKERS,
        )
    with clock.stage("build_model"):
        # The fold weights replace every layer, so no pretrained file is read.
        model = build_classifier_from_config(
            config.with_overrides(["classifier.weights=null"]), n_classes
        )
    total = np.zeros((len(image_ids), n_classes), dtype=np.float64)
    for path in weights:
        with clock.stage("load_weights"):
            load_best_weights(model, path)
        with clock.stage("classifier"):
            for batch in iter_batches(len(image_ids), config.tta.batch_size):
                images = np.asarray(cache.images[batch[0] : batch[-1] + 1])
                total[batch] += predict_presence_tta(model, images, config.tta.views)
    return (total / len(weights)).astype(np.float32)


def encode_predictions(
    cache: ImageCache,
    accumulator: FoldAccumulator,
    classes: Sequence[str],
    params: Mapping[str, PostprocessParams],
    submission_size: Sequence[int] | None,
    presence: np.ndarray | None,
    batch_size: int,
) -> pd.DataFrame:
    """Canonical table (image_id, class_name, rle) of the post-processed merged probs.

    Each image's merged prob is resized to ``submission_size`` (None: its original
    size), quantised like the OOF store (``probstore.quantise_prob``) and post-processed
    per class; ``presence`` (N, C) is the classifier's probability for gated classes.
    """
    rows: list[tuple[str, str, str]] = []
    settings = [params[name] for name in classes]
    for batch in iter_batches(len(cache.image_ids), batch_size):
        start, stop = int(batch[0]), int(batch[-1]) + 1
        merged = accumulator.merged(start, stop)
        for offset, prob in enumerate(merged):
            i = start + offset
            height, width = cache.original_sizes[i]
            target = submission_size or (int(height), int(width))
            q = quantise_prob(resize_probs(prob, target))
            masks = (
                setting.apply(q[:, :, c], None if presence is None else float(presence[i, c]))
                for c, setting in enumerate(settings)
            )
            image_id = cache.image_ids[i]
            rows.extend(
                (image_id, name, text)
                for name, text in zip(classes, rle.encode_batch(masks), strict=True)
            )
    return pd.DataFrame(rows, columns=["image_id", "class_name", "rle"])


def submission_path(submissions_dir: Path, experiment: str, now: datetime.datetime) -> Path:
    """``<dir>/<experiment>_<yyyymmdd-hhmm>.csv``, with ``-2``, ``-3``... if that exists."""
    stem = f"{experiment}_{now:%Y%m%d-%H%M}"
    path = submissions_dir / f"{stem}.csv"
    counter = 2
    while path.exists():
        path = submissions_dir / f"{stem}-{counter}.csv"
        counter += 1
    return path


def predict(
    config: Config,
    out: Path | None = None,
    submissions_dir: Path = Path("submissions"),
    use_postprocess: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Predict the test images, write and record the submission; return the run's figures.

    ``force``: go on although this config differs from the folds' training config in a
    key that matters.
    """
    weights = fold_weights(config)
    check_trained_config(config, force)
    with hold_lock(config.run_dir, f"run {config.run_dir} (predict)"):
        return _predict(config, weights, out, submissions_dir, use_postprocess)


def _predict(
    config: Config,
    weights: list[Path],
    out: Path | None,
    submissions_dir: Path,
    use_postprocess: bool,
) -> dict[str, Any]:
    clock = StageClock()
    started, cpu_started = time.perf_counter(), time.process_time()
    exp = open_experiment(config)
    inputs = inputs_key(config, use_postprocess)
    params, oof_score, oof_nested = read_postprocess(config, exp.classes, use_postprocess)
    gated = [name for name, p in params.items() if p.gate == "classifier"]
    image_ids = list_test_images(config, exp)
    data = config.data
    check_input_size(data.image_size, "data.image_size (the prediction input)")
    set_mixed_precision(config.train.mixed_precision)
    with clock.stage("cache"):
        cache = build_cache(
            exp.cache_dir,
            "test",
            Path(data.test_images),
            image_ids,
            data.image_size,
            workers=CACHE_WORKERS,
        )
    presence = (
        predict_presence(config, image_ids, len(exp.classes), exp.cache_dir, clock)
        if gated
        else None
    )
    fixed = data.image_size if config.model.architecture == "PSPNet" else None
    with clock.stage("build_model"):
        # The fold weights replace every layer, so no pretrained encoder is read.
        model = build_model(
            config.with_overrides(["model.encoder_weights=null"]), len(exp.classes), fixed
        )
    shape = (len(image_ids), *data.image_size, len(exp.classes))
    work = config.run_dir / WORK_DIR
    accumulator = FoldAccumulator(work / FOLD_MERGE, shape, len(weights), config.tta.merge)
    try:
        predict_folds(
            model,
            weights,
            cache.images,
            config.tta.views,
            config.tta.merge,
            config.tta.batch_size,
            accumulator,
            clock,
        )
        with clock.stage("postprocess"):
            table = encode_predictions(
                cache,
                accumulator,
                exp.classes,
                params,
                data.submission_size,
                presence,
                config.tta.batch_size,
            )
    finally:
        accumulator.close()
        shutil.rmtree(work, ignore_errors=True)
    with clock.stage("write"):
        result = write_outputs(
            config, exp, table, image_ids, cache, out, submissions_dir, oof_score, oof_nested
        )
    seconds = time.perf_counter() - started
    result.update(
        {
            "n_images": len(image_ids),
            "folds": len(weights),
            "views": list(config.tta.views),
            "merge": config.tta.merge,
            "classifier_gate": gated,
            "postprocess": POSTPROCESS if use_postprocess else "threshold 0.5",
            "device": describe_device(),
            "seconds": round(seconds, 3),
            "cpu_seconds": round(time.process_time() - cpu_started, 3),
            "stage_seconds": {k: round(v, 3) for k, v in clock.seconds.items()},
            "stage_cpu_seconds": {k: round(v, 3) for k, v in clock.cpu_seconds.items()},
            "inputs_key": inputs,
        }
    )
    write_json(config.run_dir / PREDICT_JSON, result)
    return result


def inputs_key(config: Config, use_postprocess: bool = True) -> str:
    """What a prediction depends on: the config, every fold's weights (size and
    modification time), the tuned post-processing (its bytes) and the test images.
    Equal keys mean the same submission (``previous_prediction``)."""
    parts: list[Any] = [config.to_dict(), use_postprocess]
    for stage in ("", CLASSIFIER_STAGE):
        for fold in range(config.folds.n_splits):
            path = config.fold_dir(fold, stage) / WEIGHTS
            if path.is_file():
                stat = path.stat()
                parts.append([str(path), stat.st_size, stat.st_mtime_ns])
    postprocess = config.run_dir / POSTPROCESS
    if use_postprocess and postprocess.is_file():
        parts.append(hashlib.sha256(postprocess.read_bytes()).hexdigest())
    folder = Path(config.data.test_images)
    if folder.is_dir():
        names = list_image_files(folder)
        parts.append(files_fingerprint(folder, names))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def previous_prediction(config: Config, use_postprocess: bool = True) -> dict[str, Any] | None:
    """The last ``predict.json`` if nothing it depends on changed since and its
    submission file is still there; else None."""
    path = config.run_dir / PREDICT_JSON
    try:
        previous = read_json(path)
    except (FileNotFoundError, ValueError):
        return None
    if previous.get("inputs_key") != inputs_key(config, use_postprocess):
        return None
    if not Path(str(previous.get("submission", ""))).is_file():
        return None
    return previous


def write_outputs(
    config: Config,
    exp: Experiment,
    table: pd.DataFrame,
    image_ids: Sequence[str],
    cache: ImageCache,
    out: Path | None,
    submissions_dir: Path,
    oof_score: float,
    oof_nested: float | None,
) -> dict[str, Any]:
    """Lay out, score (when ``data.test_truth`` is set), write and record the submission."""
    data = config.data
    sample = (
        submission_check.read_submission(data.sample_submission)
        if data.sample_submission is not None
        else None
    )
    frame = submission.make_submission_frame(table, exp.layout, exp.classes, sample)
    shapes: submission.Shapes = (
        (int(data.submission_size[0]), int(data.submission_size[1]))
        if data.submission_size is not None
        else {
            i: (int(h), int(w))
            for i, (h, w) in zip(cache.image_ids, cache.original_sizes, strict=True)
        }
    )
    if exp.layout == "instances":
        # Objects are scored one by one: one row per connected component.
        frame = submission.split_instances(frame, shapes)
    test_score = None
    if data.test_truth is not None:
        truth = submission_check.read_submission(data.test_truth)
        scored = submission.score_submission(
            frame, truth, exp.layout, exp.classes, shapes, "predictions", f"truth {data.test_truth}"
        )
        test_score = scored["overall"]
    path = Path(out) if out is not None else None
    if path is None:
        path = submission_path(submissions_dir, config.experiment, datetime.datetime.now())
    submission.write_submission_file(frame, path, exp.layout, exp.classes, image_ids, shapes)
    inside = path.resolve().parent == submissions_dir.resolve()
    submission.record_submission(
        submissions_dir / SUBMISSION_LOG,
        path.name if inside else str(path),
        config.experiment,
        oof_nested,
        oof_score,
        test_score,
    )
    return {
        "submission": str(path),
        "oof_score": oof_score,
        "oof_score_nested": oof_nested,
        "test_score": test_score,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--out", type=Path, help="submission file (default: see --submissions-dir)")
    parser.add_argument(
        "--submissions-dir",
        type=Path,
        default=Path("submissions"),
        help="folder of <experiment>_<yyyymmdd-hhmm>.csv and history.md (default: %(default)s)",
    )
    parser.add_argument(
        "--no-postprocess",
        action="store_true",
        help="threshold 0.5 for every class instead of the tuned postprocess.json",
    )
    add_force_argument(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = config_from_args(args)
        result = predict(
            config, args.out, args.submissions_dir, not args.no_postprocess, args.force
        )
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return report_interrupted("python -m pipeline.predict")
    print(f"submission: {result['submission']}")
    nested = result["oof_score_nested"]
    print(
        f"OOF Kaggle Dice: nested {'-' if nested is None else f'{nested:.4f}'} (honest: tuned "
        f"on the other folds), in-sample {result['oof_score']:.4f}"
    )
    test = result["test_score"]
    print(f"test Kaggle Dice: {'-' if test is None else f'{test:.4f}'}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result["stage_seconds"].items())
    print(f"{result['n_images']} images in {result['seconds']:.1f}s ({stages})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
