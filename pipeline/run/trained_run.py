"""A trained experiment as prediction sees it, read once (pure run layer).

``open_trained_run`` reads what prediction needs from a run directory and nothing else:
the classes (in ``postprocess.json``'s order, which tune took from the out-of-fold
stores; from those stores when nothing was tuned), the CSV format of the training file
(from its header), how image ids are spelled (``folds.csv``), every fold's weights
(listed and checked once) and the tuned post-processing (``postprocess.json``, read
once). It never reads the training masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import pandas as pd

from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.exclusive import is_exclusive
from pipeline.core.layout import (
    BEST_WEIGHTS,
    CLASSIFIER_STAGE,
    FOLD_METRICS,
    FOLDS,
    OOF,
    POSTPROCESS,
)
from pipeline.core.postprocess import PostprocessParams, at_least_one_applied, load_postprocess
from pipeline.core.prediction_plan import PRESENCE_SOURCES, PredictionPlan
from pipeline.core.probstore import ProbReader
from pipeline.run.experiment import experiment_cache_dir, submission_csv_format
from pipeline.run.fold_records import read_fold_metrics


@dataclass(frozen=True)
class TunedPostprocess:
    """The post-processing prediction applies and the out-of-fold scores it reached.

    ``score``: tuned and scored on the same OOF images (in-sample); ``nested``: each fold
    scored with settings tuned on the others (None in a file from before it existed);
    both the plain threshold-0.5 OOF score when nothing was tuned. ``gate_source``: where
    the gated classes read their presence (None: no class is gated).
    """

    params: Mapping[str, PostprocessParams]
    score: float
    nested: float | None
    at_least_one: bool
    gate_source: str | None
    tuned: bool


@dataclass(frozen=True)
class TrainedRun:
    """What prediction reads of a trained experiment (``open_trained_run``).

    ``image_ids``: the training images' ids as ``folds.csv`` spells them (file names or
    bare stems), so test ids are spelled alike. ``csv_format``: the training CSV's format.
    ``stamps``: every weight file of both stages (path, size, modification time), what
    the stored predictions are keyed by (``run.prediction.weights_key``).
    """

    config: Config
    classes: list[str]
    csv_format: str
    image_ids: list[str]
    weights: list[Path]
    classifier_weights: list[Path]
    postprocess: TunedPostprocess
    stamps: Mapping[str, list[list[object]]]

    @property
    def cache_dir(self) -> Path:
        return experiment_cache_dir(self.config)

    def plan(self) -> PredictionPlan:
        """The prediction plan of this run under its config's TTA and sizes."""
        config, tuned = self.config, self.postprocess
        size = config.data.submission_size
        presence = config.classifier.image_size if tuned.gate_source == "classifier" else None
        return PredictionPlan(
            classes=tuple(self.classes),
            input_size=(int(config.data.image_size[0]), int(config.data.image_size[1])),
            views=tuple(config.tta.views),
            merge=config.tta.merge,
            batch_size=int(config.tta.batch_size),
            postprocess={name: tuned.params[name] for name in self.classes},
            at_least_one=tuned.at_least_one,
            gate_source=tuned.gate_source,
            csv_format=self.csv_format,
            submission_size=None if size is None else (int(size[0]), int(size[1])),
            presence_size=None if presence is None else (int(presence[0]), int(presence[1])),
            exclusive=is_exclusive(config.model.activation),
        )


def open_trained_run(
    config: Config, use_postprocess: bool = True, with_classifier: bool = False
) -> TrainedRun:
    """Read a trained run for prediction; every check is made here, before any work.

    ``use_postprocess`` False: threshold 0.5 for every class, no gate. ``with_classifier``:
    list the classifier's folds although no gate reads them (their test probs are
    stored for an ensemble).

    Raises:
        FileNotFoundError: a fold without weights or unfinished, no ``postprocess.json``.
        ValueError: a damaged weights file, a ``postprocess.json`` tuned at another
            submission size or gated by a presence head this config lacks.
    """
    weights = fold_weights(config)
    tuned = read_postprocess(config, use_postprocess)
    classes = list(tuned.params)
    needs_classifier = tuned.gate_source == "classifier" or with_classifier
    classifier = fold_weights(config, CLASSIFIER_STAGE) if needs_classifier else []
    return TrainedRun(
        config=config,
        classes=classes,
        csv_format=training_csv_format(config),
        image_ids=_trained_image_ids(config),
        weights=weights,
        classifier_weights=classifier,
        postprocess=tuned,
        stamps={stage: weight_stamps(config, stage) for stage in ("", CLASSIFIER_STAGE)},
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
        if not (fold_dir / BEST_WEIGHTS).is_file():
            raise FileNotFoundError(f"fold {fold} has no weights {fold_dir / BEST_WEIGHTS}; {hint}")
        if not (fold_dir / FOLD_METRICS).is_file():
            raise FileNotFoundError(
                f"fold {fold} has not finished training (no {fold_dir / FOLD_METRICS}); "
                f"{hint} --resume"
            )
        try:  # a truncated file is found here, before any image is read or model built
            h5py.File(fold_dir / BEST_WEIGHTS, "r").close()
        except OSError as exc:
            raise ValueError(
                f"weights file {fold_dir / BEST_WEIGHTS} is damaged ({exc}); retrain its fold "
                f"with --force"
            ) from None
        paths.append(fold_dir / BEST_WEIGHTS)
    return paths


def trained_classes(config: Config) -> list[str]:
    """The class order the folds were trained with, from their out-of-fold stores (the
    same in every fold, else a ValueError naming the fold)."""
    classes: list[str] | None = None
    for fold in range(config.folds.n_splits):
        store = config.fold_dir(fold) / OOF
        found = ProbReader(store).classes
        if classes is not None and found != classes:
            raise ValueError(
                f"{store} holds classes {found}, but fold 0's store holds {classes}; the "
                "folds come from different trainings: retrain them with --force"
            )
        classes = found
    assert classes is not None, "folds.n_splits >= 2"
    return classes


def weight_stamps(config: Config, stage: str = "") -> list[list[object]]:
    """``[path, size, modification time]`` of each weight file of a stage's folds that
    exists: what stored predictions are keyed by."""
    stamps: list[list[object]] = []
    for fold in range(config.folds.n_splits):
        path = config.fold_dir(fold, stage) / BEST_WEIGHTS
        if path.is_file():
            stat = path.stat()
            stamps.append([str(path), stat.st_size, stat.st_mtime_ns])
    return stamps


def training_csv_format(config: Config) -> str:
    """The CSV format of the experiment's submissions (``experiment.submission_csv_format``)."""
    return submission_csv_format(config)


def _trained_image_ids(config: Config) -> list[str]:
    path = config.run_dir / FOLDS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {command_line('train', '--all')} makes it")
    return pd.read_csv(path, dtype=str, keep_default_na=False)["image_id"].tolist()


def read_postprocess(config: Config, use_postprocess: bool) -> TunedPostprocess:
    """The post-processing to apply, by class in the trained order: ``postprocess.json``
    (read once), or with ``use_postprocess`` False threshold 0.5 everywhere and the
    folds' OOF Kaggle Dice at 0.5 (nothing tuned: in-sample and nested are the same)."""
    if not use_postprocess:
        return _plain_postprocess(config, trained_classes(config))
    path = config.run_dir / POSTPROCESS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: tune the post-processing first "
            f"({command_line('tune', config=config.source)}), or pass --no-postprocess for "
            "threshold 0.5"
        )
    params, extra = load_postprocess(path)
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
    return TunedPostprocess(
        params=params,
        score=float(scores["tuned"]),
        nested=float(nested) if nested is not None else None,
        at_least_one=at_least_one_applied(extra),
        gate_source=_gate_source(config, path, params, extra),
        tuned=True,
    )


def tuned_gate_source(config: Config) -> str | None:
    """Where ``postprocess.json``'s gated classes take their presence (``classifier`` or
    ``head``), or None when there is no such file or no class is gated (``read_postprocess``
    checks the same on the file it reads)."""
    path = config.run_dir / POSTPROCESS
    if not path.is_file():
        return None
    params, extra = load_postprocess(path)
    return _gate_source(config, path, params, extra)


def _gate_source(
    config: Config,
    path: Path,
    params: Mapping[str, PostprocessParams],
    extra: Mapping[str, object],
) -> str | None:
    """``classifier`` in a file from before the presence head; a head-gated file with a
    config whose model has no presence head is a ValueError (the head's figures would
    be missing, or stale ones from an earlier training)."""
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


def _plain_postprocess(config: Config, classes: Sequence[str]) -> TunedPostprocess:
    metrics = [read_fold_metrics(config.fold_dir(k)) for k in range(config.folds.n_splits)]
    for k, m in enumerate(metrics):
        if not isinstance(m.get("n_val"), int) or not isinstance(
            m.get("oof_kaggle_dice_050"), (int, float)
        ):
            raise ValueError(
                f"{config.fold_dir(k) / FOLD_METRICS} lacks n_val or oof_kaggle_dice_050 "
                f"(damaged, or from another version); retrain the fold with --force"
            )
    n_val = sum(m["n_val"] for m in metrics)
    oof = sum(m["oof_kaggle_dice_050"] * m["n_val"] for m in metrics) / n_val
    plain = {name: PostprocessParams(threshold=0.5, min_area=0) for name in classes}
    return TunedPostprocess(plain, oof, oof, False, None, tuned=False)
