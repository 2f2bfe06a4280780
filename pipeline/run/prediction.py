"""What a prediction reads and writes around the network (pure run layer).

- the test set: ``list_test_images`` (the sample submission's images, checked to be in
  the test folder, or every image of ``data.test_images``);
- the inputs: ``fold_weights`` (every finished fold's weights, checked readable) and
  ``read_postprocess`` (the tuned post-processing and the OOF scores it reaches);
- whether they changed: ``inputs_key`` and ``previous_prediction``;
- the outputs: ``submission_path`` and ``write_outputs`` (lay out, score against
  ``data.test_truth``, write and record the submission).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import pandas as pd

from pipeline.core import submission, submission_check
from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.images import (
    IMAGE_EXTENSIONS,
    files_fingerprint,
    folder_image_ids,
    list_image_files,
    resolve_image_path,
)
from pipeline.core.layout import BEST_WEIGHTS as WEIGHTS
from pipeline.core.layout import (
    CLASSIFIER_STAGE,
    POSTPROCESS,
    SUBMISSION_LOG,
)
from pipeline.core.layout import FOLD_METRICS as METRICS
from pipeline.core.layout import PREDICT as PREDICT_JSON
from pipeline.core.mask_csv import read_masks
from pipeline.core.postprocess import PostprocessParams, at_least_one_applied, load_postprocess
from pipeline.run.experiment import Experiment
from pipeline.run.fold_records import read_fold_metrics
from pipeline.run.json_files import read_json
from pipeline.run.oof import PRESENCE_SOURCES


class ImageSizes(Protocol):
    """What ``write_outputs`` reads of the test images' cache (``run.image_cache.ImageCache``)."""

    @property
    def image_ids(self) -> list[str]: ...

    @property
    def original_sizes(self) -> np.ndarray: ...


def list_test_images(config: Config, exp: Experiment) -> list[str]:
    """Test image ids: those the sample submission lists, else every image file of
    ``data.test_images`` (sorted), spelled as the training CSV names its images."""
    data = config.data
    if data.sample_submission is not None:
        sample = read_masks(
            data.sample_submission,
            csv_format=exp.csv_format,
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
    command = "train-classifier" if stage else "train"
    paths = []
    for fold in range(config.folds.n_splits):
        fold_dir = config.fold_dir(fold, stage)
        hint = (
            f"train it: {command_line(command, f'--fold {fold}', config=config.source)} "
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
) -> tuple[dict[str, PostprocessParams], float, float | None, bool]:
    """Per-class post-processing, the OOF scores it reaches (in-sample and nested) and
    whether the at-least-one rule applies (the gates' presence: ``tuned_gate_source``).

    From ``postprocess.json`` (``extra.scores.tuned``: tuned and scored on the same OOF
    images; ``tuned_nested``: each fold scored with settings tuned on the others, None
    in a file from before it existed), or with ``use_postprocess`` False threshold 0.5
    everywhere and the folds' OOF Kaggle Dice at 0.5 (nothing tuned: both the same).
    """
    if not use_postprocess:
        metrics = [read_fold_metrics(config.fold_dir(k)) for k in range(config.folds.n_splits)]
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
        plain = {name: PostprocessParams(threshold=0.5, min_area=0) for name in classes}
        return plain, oof, oof, False
    path = config.run_dir / POSTPROCESS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: tune the post-processing first "
            f"({command_line('tune', config=config.source)}), or pass --no-postprocess for "
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
    nested_score = float(nested) if nested is not None else None
    return params, float(scores["tuned"]), nested_score, at_least_one_applied(extra)


def tuned_gate_source(config: Config) -> str | None:
    """Where ``postprocess.json``'s classifier-gated classes take their presence from
    (``classifier`` or ``head``; ``classifier`` in a file from before the presence head),
    or None when there is no such file or no class is gated. A head-gated file with a
    config whose model has no presence head is a ValueError: the head's figures would be
    missing, or stale ones from an earlier training."""
    path = config.run_dir / POSTPROCESS
    if not path.is_file():
        return None
    params, extra = load_postprocess(path)
    gated = [name for name, p in params.items() if p.uses_classifier]
    if not gated:
        return None
    source = str(extra.get("gate_source") or "classifier")
    if source not in PRESENCE_SOURCES:
        raise ValueError(
            f"{path}: gate_source must be one of {list(PRESENCE_SOURCES)}; got {source!r}"
        )
    if source == "head" and not config.model.classification_head:
        raise ValueError(
            f"{path} gates {gated} with the presence head, but model.classification_head "
            "is false in this config: set it as the folds were trained, or tune again"
        )
    return source


def submission_path(submissions_dir: Path, experiment: str, now: datetime.datetime) -> Path:
    """``<dir>/<experiment>_<yyyymmdd-hhmm>.csv``, with ``-2``, ``-3``... if that exists."""
    stem = f"{experiment}_{now:%Y%m%d-%H%M}"
    path = submissions_dir / f"{stem}.csv"
    counter = 2
    while path.exists():
        path = submissions_dir / f"{stem}-{counter}.csv"
        counter += 1
    return path


def inputs_key(config: Config, use_postprocess: bool = True) -> str:
    """What a prediction depends on: the config, every fold's weights (size and
    modification time), the tuned post-processing (its bytes) and the test images.
    Equal keys mean the same submission (``previous_prediction``)."""
    parts: list[Any] = [config.to_dict(), use_postprocess]
    postprocess = config.run_dir / POSTPROCESS
    if use_postprocess and postprocess.is_file():
        parts.append(hashlib.sha256(postprocess.read_bytes()).hexdigest())
    return weights_key(config, parts, ("", CLASSIFIER_STAGE))


def weights_key(config: Config, parts: list[Any], stages: Sequence[str]) -> str:
    """Hash of ``parts``, the fold weights of ``stages`` (path, size, modification time)
    and the test images' fingerprint."""
    parts = list(parts)
    for stage in stages:
        for fold in range(config.folds.n_splits):
            path = config.fold_dir(fold, stage) / WEIGHTS
            if path.is_file():
                stat = path.stat()
                parts.append([str(path), stat.st_size, stat.st_mtime_ns])
    folder = Path(config.data.test_images)
    if folder.is_dir():
        parts.append(files_fingerprint(folder, list_image_files(folder)))
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
    cache: ImageSizes,
    out: Path | None,
    submissions_dir: Path,
    oof_score: float,
    oof_nested: float | None,
) -> dict[str, Any]:
    """Lay out, score (when ``data.test_truth`` is set), write and record the submission.

    ``cache``: the test images' cache (``run.image_cache.ImageCache``), for their original sizes.
    """
    data = config.data
    sample = (
        submission_check.read_submission(data.sample_submission)
        if data.sample_submission is not None
        else None
    )
    frame = submission.make_submission_frame(table, exp.csv_format, exp.classes, sample)
    shapes: submission.Shapes = (
        (int(data.submission_size[0]), int(data.submission_size[1]))
        if data.submission_size is not None
        else {
            i: (int(h), int(w))
            for i, (h, w) in zip(cache.image_ids, cache.original_sizes, strict=True)
        }
    )
    if exp.csv_format == "instances":
        # Objects are scored one by one: one row per connected component.
        frame = submission.split_instances(frame, shapes)
    test_score = None
    if data.test_truth is not None:
        truth = submission_check.read_submission(data.test_truth)
        scored = submission.score_submission(
            frame,
            truth,
            exp.csv_format,
            exp.classes,
            shapes,
            "predictions",
            f"truth {data.test_truth}",
        )
        test_score = scored["overall"]
    path = Path(out) if out is not None else None
    if path is None:
        path = submission_path(submissions_dir, config.experiment, datetime.datetime.now())
    submission.write_submission_file(frame, path, exp.csv_format, exp.classes, image_ids, shapes)
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
