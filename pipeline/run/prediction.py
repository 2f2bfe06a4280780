"""What a prediction reads and writes around the predictor (pure run layer).

- the test set: ``list_test_images`` (the sample submission's images, checked to be in
  the test folder, or every image of ``data.test_images``);
- whether the inputs changed: ``inputs_key`` and ``previous_prediction`` (the inputs
  themselves, weights and post-processing, are read by ``run.trained_run``);
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

import numpy as np
import pandas as pd

from pipeline.core import submission, submission_check
from pipeline.core.config import Config
from pipeline.core.images import (
    IMAGE_EXTENSIONS,
    files_fingerprint,
    folder_image_ids,
    list_image_files,
    missing_images,
)
from pipeline.core.layout import (
    CLASSIFIER_STAGE,
    POSTPROCESS,
    SUBMISSION_LOG,
)
from pipeline.core.layout import PREDICT as PREDICT_JSON
from pipeline.core.mask_csv import read_masks
from pipeline.run.json_files import read_json
from pipeline.run.trained_run import weight_stamps


class TrainedData(Protocol):
    """What prediction needs to know of the training data: its classes, CSV format and
    how its image ids are spelled (``run.trained_run.TrainedRun``, or an ``Experiment``)."""

    @property
    def classes(self) -> list[str]: ...

    @property
    def csv_format(self) -> str: ...

    @property
    def image_ids(self) -> list[str]: ...


class ImageSizes(Protocol):
    """What ``write_outputs`` reads of the test images' cache (``run.image_cache.ImageCache``)."""

    @property
    def image_ids(self) -> list[str]: ...

    @property
    def original_sizes(self) -> np.ndarray: ...


def list_test_images(config: Config, exp: TrainedData) -> list[str]:
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
    missing = missing_images(folder, image_ids)
    if missing:
        raise FileNotFoundError(
            f"sample submission {sample!r} lists {len(missing)} image(s) that the test folder "
            f"{str(folder)!r} lacks, e.g. {missing[:3]}; data.sample_submission and "
            f"data.test_images must describe the same test set"
        )


def submission_path(submissions_dir: Path, experiment: str, now: datetime.datetime) -> Path:
    """``<dir>/<experiment>_<yyyymmdd-hhmm>.csv``, with ``-2``, ``-3``... if that exists."""
    stem = f"{experiment}_{now:%Y%m%d-%H%M}"
    path = submissions_dir / f"{stem}.csv"
    counter = 2
    while path.exists():
        path = submissions_dir / f"{stem}-{counter}.csv"
        counter += 1
    return path


def inputs_key(
    config: Config,
    use_postprocess: bool = True,
    stamps: Mapping[str, list[list[object]]] | None = None,
) -> str:
    """What a prediction depends on: the config, every fold's weights (size and
    modification time; ``stamps`` by stage when the caller listed them), the tuned
    post-processing (its bytes) and the test images. Equal keys mean the same submission
    (``previous_prediction``)."""
    parts: list[Any] = [config.to_dict(), use_postprocess]
    postprocess = config.run_dir / POSTPROCESS
    if use_postprocess and postprocess.is_file():
        parts.append(hashlib.sha256(postprocess.read_bytes()).hexdigest())
    stages = ("", CLASSIFIER_STAGE)
    listed = stamps or {stage: weight_stamps(config, stage) for stage in stages}
    return weights_key(config, parts, [stamp for stage in stages for stamp in listed[stage]])


def weights_key(config: Config, parts: list[Any], stamps: Sequence[list[object]]) -> str:
    """Hash of ``parts``, weight files' ``stamps`` (path, size, modification time;
    ``trained_run.weight_stamps``) and the test images' fingerprint."""
    parts = [*parts, *stamps]
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
    exp: TrainedData,
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
