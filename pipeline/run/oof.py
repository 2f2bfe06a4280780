"""A run's out-of-fold predictions, read in one place (tune, evaluate, ensembles).

- ``open_segmentation_oof``: every fold's prob store (``fold_K/oof/``), each checked to
  hold exactly the fold's validation images with the experiment's classes;
- ``read_classifier_oof``: every classifier fold's ``oof_cls.csv`` that exists (or the
  presence head's ``oof_presence.csv``, ``presence_source``), checked the same way plus
  columns, [0, 1] values and unique ids; ``write_presence_oof`` writes either;
- ``read_classifier_probs``: those tables as image_id -> (C,) presence probs, every
  fold's or none;
- ``iter_oof``: the stores streamed as ``(image_id, fold, q, original size)``, checked to
  be at the submission size.

An OOF file with other images than its fold's validation part means another split (or
leakage): it is refused, naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.atomic import write_csv
from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.layout import CLASSIFIER_STAGE, FOLDS, OOF, OOF_CLS, OOF_PRESENCE
from pipeline.core.prediction_plan import PRESENCE_SOURCES
from pipeline.core.probstore import ProbReader
from pipeline.run.experiment import Experiment
from pipeline.run.fold_records import check_folds_finished


def check_fold_ids(ids: Sequence[str], exp: Experiment, fold: int, source: str) -> None:
    """Out-of-fold files must hold exactly the fold's validation images: no leakage."""
    expected = set(exp.members(fold)[1])
    found = set(ids)
    if found != expected:
        extra, absent = sorted(found - expected), sorted(expected - found)
        raise ValueError(
            f"{source} must hold exactly the {len(expected)} validation images of fold {fold} "
            f"in {exp.run_dir / FOLDS}; got {len(extra)} others (e.g. {extra[:3]}) and "
            f"{len(absent)} missing (e.g. {absent[:3]}): was it made with another split?"
        )


def open_segmentation_oof(config: Config, exp: Experiment) -> list[ProbReader]:
    """The out-of-fold prob store of every fold, in fold order.

    Every fold must be finished (``fold_records.check_folds_finished``) and its store
    must hold exactly the fold's validation images with the experiment's classes.
    """
    check_folds_finished(config)
    readers = []
    for k in range(exp.n_folds):
        reader = ProbReader(config.fold_dir(k) / OOF)
        if reader.classes != exp.classes:
            raise ValueError(
                f"prob store {reader.directory} must have classes {exp.classes}; "
                f"got {reader.classes}"
            )
        check_fold_ids(reader.image_ids, exp, k, str(reader.directory))
        readers.append(reader)
    return readers


# A streaming pass over the stores: images read ahead of the scoring (a Clouds image:
# 0.7 MB; the store's read chunks, probstore.DEFAULT_BATCH_BYTES, bound the rest), and
# threads computing per-image figures.
READ_AHEAD_IMAGES = 32
MAX_WORKERS = 4


def presence_oof_path(config: Config, fold: int, source: str = "classifier") -> Path:
    """Fold ``fold``'s OOF presence table: the separate classifier's ``oof_cls.csv`` or
    the segmentation model's presence head's ``oof_presence.csv``."""
    if source not in PRESENCE_SOURCES:
        raise ValueError(f"presence source must be one of {list(PRESENCE_SOURCES)}; got {source!r}")
    if source == "head":
        return config.fold_dir(fold) / OOF_PRESENCE
    return config.fold_dir(fold, CLASSIFIER_STAGE) / OOF_CLS


def presence_source(config: Config, exp: Experiment) -> str | None:
    """Where the classifier gates' presence comes from: the separate classifier when any
    of its folds has OOF probs (a dedicated model), else the presence head when the
    model has one (``model.classification_head``), else nowhere (None)."""
    if any(presence_oof_path(config, k).is_file() for k in range(exp.n_folds)):
        return "classifier"
    return "head" if config.model.classification_head else None


def read_presence_table(path: Path, classes: Sequence[str]) -> pd.DataFrame:
    """A presence table (``oof_cls.csv``, ``oof_presence.csv``, ``test_presence.csv``):
    columns ``image_id`` then ``classes`` in order, probabilities in [0, 1] (read as
    float64), each image once; ValueError names the file and the first bad row."""
    expected = ["image_id", *classes]
    frame = pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False)
    if list(frame.columns) != expected:
        raise ValueError(f"{path} must have columns {expected}; got {list(frame.columns)}")
    values = frame[list(classes)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~((values >= 0) & (values <= 1)).all(axis=1))
    if len(bad):
        row = int(bad[0])
        raise ValueError(
            f"{path} row {row + 2} (image_id {frame['image_id'].iloc[row]!r}): "
            f"probabilities must be numbers in [0, 1]; got {values[row].tolist()}"
        )
    if frame["image_id"].duplicated().any():
        duplicated = frame["image_id"][frame["image_id"].duplicated()].iloc[0]
        raise ValueError(f"{path}: image_id {duplicated!r} appears more than once")
    frame[list(classes)] = values
    return frame


def read_classifier_oof(
    config: Config, exp: Experiment, source: str = "classifier"
) -> tuple[pd.DataFrame | None, list[int]]:
    """OOF presence probs of ``source`` (``presence_oof_path``): a frame
    ``image_id, fold, <classes>`` of the folds that have their table (None if none has),
    and the folds without one.

    Each file must have columns ``image_id`` then the classes in order, probabilities
    in [0, 1], each image once and exactly the fold's validation images.
    """
    frames, missing = [], []
    for k in range(exp.n_folds):
        path = presence_oof_path(config, k, source)
        if not path.is_file():
            missing.append(k)
            continue
        frame = read_presence_table(path, exp.classes)
        check_fold_ids(frame["image_id"].tolist(), exp, k, str(path))
        frames.append(frame.assign(fold=k))
    if not frames:
        return None, missing
    return pd.concat(frames, ignore_index=True)[["image_id", "fold", *exp.classes]], missing


def iter_oof(
    config: Config,
    readers: Sequence[ProbReader],
    original_sizes: Mapping[str, tuple[int, int]],
) -> Iterator[tuple[str, int, np.ndarray, tuple[int, int]]]:
    """Stream ``(image_id, fold, q, original size)`` over every fold's store, sequentially.

    ``q`` is uint8 (C, H, W) as stored, checked to be at the submission size (or the
    image's own size when there is none).
    """
    size = config.data.submission_size
    for fold, reader in enumerate(readers):
        for image_id, q in reader.iter():
            if image_id not in original_sizes:
                raise ValueError(
                    f"image_id {image_id!r} of {reader.directory} has no original size in the "
                    f"training image cache index; rebuild it with {command_line('train')}"
                )
            original = original_sizes[image_id]
            target = (int(size[0]), int(size[1])) if size is not None else original
            if q.shape[1:] != target:
                raise ValueError(
                    f"{reader.directory}: image {image_id!r} is stored at "
                    f"{q.shape[1]}x{q.shape[2]}; expected {target[0]}x{target[1]} "
                    f"(data.submission_size {size}): was the fold predicted with another config?"
                )
            yield image_id, fold, q, original


def read_classifier_probs(
    config: Config, exp: Experiment, source: str = "classifier"
) -> dict[str, np.ndarray] | None:
    """image_id -> (C,) float64 presence probs of ``source`` (the separate classifier or
    the presence head), or None if no fold has any.

    Read by ``read_classifier_oof``; either every fold has its table or none (a
    partial classifier would gate some folds only).
    """
    frame, missing = read_classifier_oof(config, exp, source)
    if frame is None and source == "classifier":
        return None
    if missing:
        present = sorted(set(range(exp.n_folds)) - set(missing))
        path = presence_oof_path(config, missing[0], source)
        if source == "head":
            raise FileNotFoundError(
                f"model.classification_head is on, but {path} is missing (folds {missing} "
                "were trained without the head); retrain them with "
                f"`{command_line('train', f'--fold {missing[0]} --force', config=config.source)}`"
                ", or set model.classification_head=false"
            )
        raise FileNotFoundError(
            f"classifier out-of-fold probs exist for folds {present} but not for folds "
            f"{missing} ({path} not found); finish them with "
            f"`{command_line('train-classifier', f'--fold {missing[0]}', config=config.source)}`"
            f", or remove {config.run_dir / CLASSIFIER_STAGE} to tune "
            "without the classifier gate"
        )
    assert frame is not None
    values = frame[exp.classes].to_numpy(np.float64)
    return dict(zip(frame["image_id"], values, strict=True))


def write_presence_oof(frame: pd.DataFrame, path: Path) -> Path:
    """Write an OOF presence table (``image_id`` then one column per class: a classifier's
    ``oof_cls.csv`` or a presence head's ``oof_presence.csv``) atomically."""
    write_csv(path, frame, float_format="%.6f")
    return path
