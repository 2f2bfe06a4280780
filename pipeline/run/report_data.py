"""What the CV report reads from a run directory and the numbers it computes (run layer).

``open_run`` opens a run's out-of-fold prob stores, tune's ``postprocess.json`` and the
classifier's out-of-fold probs (``RunData``) and plans the post-processing stages
(``plain``, ``tuned``, ``gated``); ``score_oof`` is the one streaming pass that scores
every OOF image at every stage; ``load_oof_example`` gives one image's masks for the
figures and notebooks. Also the recorded wall times (``timed_runs``), the classifier's
ROC AUC, and the CV figures tune recorded (``cv_scores``, ``tune_check``). Pure: never
imports TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.exclusive import (
    confusion_matrix,
    exclusive_levels,
    is_exclusive,
    mask_labels,
)
from pipeline.core.folds import presence_matrix
from pipeline.core.images import (
    cache_path,
    read_image,
    read_image_size,
    read_original_sizes,
    resolve_image_path,
)
from pipeline.core.layout import CLASSIFIER_STAGE, FOLD_METRICS
from pipeline.core.layout import POSTPROCESS as POSTPROCESS_FILE
from pipeline.core.layout import PREDICT as PREDICT_FILE
from pipeline.core.masks import truth_masks
from pipeline.core.postprocess import PostprocessParams, at_least_one_applied, load_postprocess
from pipeline.core.probstore import ProbReader
from pipeline.core.report_figures import overlay
from pipeline.core.report_scores import ScoreAccumulator, WorstImages, predict_masks, presence_auc
from pipeline.run.experiment import Experiment, open_experiment
from pipeline.run.json_files import read_json
from pipeline.run.oof import (
    open_segmentation_oof,
    presence_oof_path,
    presence_source,
    read_classifier_oof,
)
from pipeline.run.trained_run import tuned_gate_source

log = logging.getLogger(__name__)

PLAIN = PostprocessParams(threshold=0.5, min_area=0)
STAGE_TEXT = {
    "plain": "threshold 0.5, no minimum area, no gate",
    "tuned": "tuned threshold and minimum area, no gate",
    "gated": "tuned threshold, minimum area and gate (postprocess.json)",
}


@dataclass(frozen=True)
class Stage:
    """One post-processing stage: a name and one setting per class."""

    name: str
    params: dict[str, PostprocessParams]
    at_least_one: bool = False  # the at-least-one rule after the settings


@dataclass(frozen=True)
class RunData:
    """Everything the report reads from one run directory, opened but not streamed."""

    config: Config
    exp: Experiment
    readers: list[ProbReader]
    stages: list[Stage]
    tune_extra: dict[str, Any] | None
    classifier: pd.DataFrame | None  # image_id, fold, one column per class
    classifier_missing: list[int]
    notes: list[str]
    rles: dict[str, list[str]]  # image_id -> per-class RLE at the image's own size
    sizes: dict[str, tuple[int, int]]  # image_id -> original (H, W), filled as needed
    presence_source: str = "classifier"  # oof.presence_source: "classifier" or "head"

    def original_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of a training image: from the image cache's index, else from its file."""
        if image_id not in self.sizes:
            folder = self.config.data.train_images
            self.sizes[image_id] = read_image_size(resolve_image_path(folder, image_id))
        return self.sizes[image_id]

    def truth(self, image_id: str, stored: tuple[int, ...]) -> np.ndarray:
        """Truth (C, H, W) uint8 {0, 1} of one image at the size of its stored (C, H, W) probs.

        That size must be ``data.submission_size``, or the image's own when it is null.
        """
        size = self.config.data.submission_size
        original = self.original_size(image_id)
        target = (int(size[0]), int(size[1])) if size is not None else original
        if tuple(stored[1:]) != target:
            raise ValueError(
                f"OOF image {image_id!r} is stored at {stored[1]}x{stored[2]}; expected "
                f"{target[0]}x{target[1]} (data.submission_size {size}): another config?"
            )
        return truth_masks(self.rles[image_id], original, target).transpose(2, 0, 1)

    @property
    def exclusive(self) -> bool:
        """``model.activation: softmax``: argmax masks, void pixels scored nowhere."""
        return is_exclusive(self.config.model.activation)

    def scored(self, image_id: str, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
        """(class maps, truth, void) of one stored (C, H, W) image as every score sees
        them: a sigmoid run's ``q`` and truth as they are (void None); a softmax run's
        argmax masks (``exclusive_levels``) and truth, both empty at void pixels, and
        the (H, W) void mask (None without void pixels)."""
        truth = self.truth(image_id, q.shape)
        if not self.exclusive:
            return q, truth, None
        void_rle = self.exp.void.get(image_id)
        void = None
        if void_rle:
            original = self.original_size(image_id)
            void = truth_masks([void_rle], original, q.shape[1:])[..., 0]
            truth = truth * (void == 0)
        return exclusive_levels(q, void), truth, void

    def classifier_probs(self) -> dict[str, np.ndarray]:
        """image_id -> (C,) float64 presence probs of the folds that have them."""
        if self.classifier is None:
            return {}
        values = self.classifier[self.exp.classes].to_numpy(np.float64)
        return dict(zip(self.classifier["image_id"], values, strict=True))


@dataclass(frozen=True)
class OofExample:
    """One out-of-fold image at the stores' size and its masks at every stage."""

    image_id: str
    fold: int
    image: np.ndarray  # (H, W, 3) uint8 RGB, resized to the stored size
    truth: np.ndarray  # (H, W, C) uint8 {0, 1}
    prob: np.ndarray  # (H, W, C) float32 in [0, 1]
    masks: dict[str, np.ndarray]  # stage -> (H, W, C) uint8 {0, 1}
    kaggle_dice: dict[str, np.ndarray]  # stage -> (C,) float64

    def panels(self) -> list[tuple[str, np.ndarray]]:
        """``(title, RGB image)``: the image, the truth and each stage's masks overlaid."""
        panels = [(f"{self.image_id} (fold {self.fold})", self.image)]
        panels.append(("truth", overlay(self.image, self.truth)))
        for stage, masks in self.masks.items():
            score = float(self.kaggle_dice[stage].mean())
            panels.append((f"{stage}: Kaggle Dice {score:.3f}", overlay(self.image, masks)))
        return panels


def plan_stages(config: Config, classes: Sequence[str]) -> tuple[list[Stage], dict | None]:
    """The stages to score and tune's ``extra``; only ``plain`` when tune has not run."""
    plain = Stage("plain", {name: PLAIN for name in classes})
    path = config.run_dir / POSTPROCESS_FILE
    if not path.is_file():
        return [plain], None
    chosen, extra = load_postprocess(path, classes)
    per_class = extra.get("per_class", {})
    tuned = {}
    for name, params in chosen.items():
        recorded = per_class.get(name, {}).get("no_gate_params")
        tuned[name] = (
            PostprocessParams.from_dict(recorded, where=f"{path} no_gate_params of {name!r}")
            if recorded
            else replace(params, gate="none", gate_threshold=None, topk_fraction=None)
        )
    gated = Stage("gated", chosen, at_least_one_applied(extra))
    return [plain, Stage("tuned", tuned), gated], extra


def open_run(config: Config) -> RunData:
    """Open a run for the report: the OOF stores (required) and whatever else exists."""
    exp = open_experiment(config)
    readers = open_segmentation_oof(config, exp)
    stages, extra = plan_stages(config, exp.classes)
    # The presence tune gated with (recorded), else the one it would use now.
    recorded = (extra or {}).get("gate_source") if (extra or {}).get("classifier_used") else None
    tuned_gate_source(config)  # a head-gated tuning needs a model with the head
    source = recorded or presence_source(config, exp) or "classifier"
    classifier, missing = read_classifier_oof(config, exp, source)
    notes = []
    if extra is None:
        notes.append(
            f"post-processing not available: run `{command_line('tune', config=config.source)}`"
            " (only the plain threshold-0.5 stage is scored)"
        )
    what, command = (
        ("the presence head", command_line("train", "--all --force", config=config.source))
        if source == "head"
        else ("the classifier", command_line("train-classifier", "--all", config=config.source))
    )
    if missing:
        notes.append(f"OOF presence probs of {what} missing for folds {missing}: run `{command}`")
    gated_by_classifier = [
        name for stage in stages for name, p in stage.params.items() if p.uses_classifier
    ]
    if gated_by_classifier and missing:
        table = presence_oof_path(config, missing[0], source).name
        raise FileNotFoundError(
            f"{config.run_dir / POSTPROCESS_FILE} gates {sorted(set(gated_by_classifier))} with "
            f"{what}, but folds {missing} have no {table}; run `{command}`"
        )
    try:
        sizes = read_original_sizes(cache_path(exp.cache_dir, "train", config.data.image_size))
    except FileNotFoundError:
        sizes = {}  # e.g. a run copied without its cache: sizes come from the image files
    return RunData(
        config, exp, readers, stages, extra, classifier, missing, notes, exp.rles(), sizes, source
    )


def score_oof(
    run: RunData, n_worst: int, confusion: np.ndarray | None = None
) -> tuple[pd.DataFrame, list[tuple[float, str, int]]]:
    """The streaming pass: (``ScoreAccumulator.counts()``, the ``n_worst`` images
    ``(mean Kaggle Dice at the last stage, image_id, fold)``, lowest first).

    ``confusion`` ((C+1, C+1) int64, a softmax run): the last stage's pixel confusion
    matrix (``exclusive.confusion_matrix``, void pixels left out) is added to it."""
    names = [stage.name for stage in run.stages]
    accumulator = ScoreAccumulator(run.exp.classes, len(run.readers), names)
    worst = WorstImages(n_worst)
    clf = run.classifier_probs()
    params = [[stage.params[c] for c in run.exp.classes] for stage in run.stages]
    for fold, reader in enumerate(run.readers):
        for image_id, q in reader.iter():
            levels, truth, void = run.scored(image_id, q)
            for stage, stage_params in zip(run.stages, params, strict=True):
                pred = predict_masks(levels, stage_params, clf.get(image_id), stage.at_least_one)
                dice = accumulator.add(stage.name, fold, truth, pred)
            worst.add(float(dice.mean()), image_id, fold)
            if confusion is not None:
                confusion += confusion_matrix(
                    mask_labels(truth.transpose(1, 2, 0)),
                    mask_labels(pred.transpose(1, 2, 0)),
                    len(run.exp.classes),
                    void,
                )
    return accumulator.counts(), [(s, i, f) for s, i, f in worst.items()]


def load_oof_example(run: RunData, image_id: str) -> OofExample:
    """One OOF image with its truth, probs and masks at every stage of ``run``."""
    folds = [k for k, reader in enumerate(run.readers) if image_id in reader]
    if not folds:
        raise KeyError(f"image_id {image_id!r} is in no fold's OOF store of {run.config.run_dir}")
    fold = folds[0]
    q = np.asarray(run.readers[fold].get(image_id))
    levels, truth, _ = run.scored(image_id, q)
    clf = run.classifier_probs().get(image_id)
    masks, dice = {}, {}
    for stage in run.stages:
        params = [stage.params[c] for c in run.exp.classes]
        pred = predict_masks(levels, params, clf, stage.at_least_one)
        one = ScoreAccumulator(run.exp.classes, 1, [stage.name])
        dice[stage.name] = one.add(stage.name, 0, truth, pred)
        masks[stage.name] = pred.transpose(1, 2, 0)
    height, width = q.shape[1:]
    try:
        image = read_image(resolve_image_path(run.config.data.train_images, image_id))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    except (FileNotFoundError, ValueError) as err:
        log.warning("showing %s on a gray background: %s", image_id, err)
        image = np.full((height, width, 3), 128, np.uint8)
    return OofExample(
        image_id,
        fold,
        image,
        truth.transpose(1, 2, 0),
        ProbReader.to_prob(q).transpose(1, 2, 0),
        masks,
        dice,
    )


def timed_runs(config: Config, n_folds: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Recorded wall times: ``{run, seconds, device}`` per training fold and prediction."""
    runs, notes = [], []
    for stage, label in (("", "segmentation"), (CLASSIFIER_STAGE, "classifier")):
        paths = [config.fold_dir(k, stage) / FOLD_METRICS for k in range(n_folds)]
        missing = [k for k, path in enumerate(paths) if not path.is_file()]
        if missing:
            notes.append(f"{label} folds {missing}: no {FOLD_METRICS}, not counted")
        for k, path in enumerate(paths):
            if k not in missing:
                m = read_json(path)
                seconds = float(m.get("train_seconds", 0.0)) + float(m.get("oof_seconds", 0.0))
                device = m.get("device", "not recorded")
                runs.append({"run": f"{label} fold {k}", "seconds": seconds, "device": device})
    path = config.run_dir / PREDICT_FILE
    if path.is_file():
        m = read_json(path)
        if "seconds" in m and "device" in m:
            runs.append(
                {"run": "prediction", "seconds": float(m["seconds"]), "device": m["device"]}
            )
        else:
            notes.append(f"prediction: {path} records no seconds and device, not counted")
    else:
        notes.append(f"prediction: not run ({command_line('predict', config=config.source)})")
    return runs, notes


def classifier_auc(run: RunData) -> pd.DataFrame | None:
    """ROC AUC of the classifier's OOF probs per ``fold`` (and ``pooled``) and class."""
    if run.classifier is None:
        return None
    classes = run.exp.classes
    presence = presence_matrix(run.exp.table, classes).set_index("image_id")
    truth = presence.loc[run.classifier["image_id"], classes].to_numpy(np.float64)
    probs = run.classifier[classes].to_numpy(np.float64)
    folds = run.classifier["fold"].to_numpy()
    rows = []
    for k in sorted(set(folds.tolist())):
        rows.append(
            {
                "fold": str(k),
                **presence_auc(truth[folds == k], probs[folds == k], classes),
            }
        )
    rows.append({"fold": "pooled", **presence_auc(truth, probs, classes)})
    return pd.DataFrame(rows)


# Tune's names for the scores of the three stages in postprocess.json's extra.
TUNE_KEYS = {"plain": "plain", "tuned": "no_gate", "gated": "tuned"}


@dataclass(frozen=True)
class Scores:
    """The streaming pass's tables: ``score_table`` per fold and pooled, their summary."""

    by_fold: pd.DataFrame
    pooled: pd.DataFrame
    summary: pd.DataFrame
    worst: list[tuple[float, str, int]]


def tune_check(run: RunData, pooled: pd.DataFrame) -> pd.DataFrame | None:
    """Pooled Kaggle Dice recomputed here next to the one tune recorded, per stage and class."""
    per_class = (run.tune_extra or {}).get("per_class")
    if not per_class:
        return None
    rows = []
    for stage in run.stages:
        scores = pooled[pooled["stage"] == stage.name].set_index("class")["kaggle_dice"]
        for name in run.exp.classes:
            recorded = per_class.get(name, {}).get(TUNE_KEYS[stage.name])
            if recorded is not None:
                here = float(scores[name])
                rows.append(
                    {"stage": stage.name, "class": name, "tune": float(recorded), "report": here}
                )
    frame = pd.DataFrame(rows, columns=["stage", "class", "tune", "report"])
    return frame.assign(difference=frame["report"] - frame["tune"]) if rows else None


def cv_scores(tune_extra: dict[str, Any] | None) -> pd.DataFrame | None:
    """The CV figures tune recorded, honest first: per class and overall, the nested
    score (settings tuned on the other folds), the in-sample one (tuned and scored on
    the same images) and plain threshold 0.5; None before tuning."""
    if not tune_extra or "scores" not in tune_extra:
        return None
    rows = []
    for name, scores in [
        *tune_extra.get("per_class", {}).items(),
        ("overall", tune_extra["scores"]),
    ]:
        stability = tune_extra.get("stability", {}).get(name)
        rows.append(
            {
                "class": name,
                "tuned, nested (honest)": scores.get("tuned_nested", float("nan")),
                "tuned, in-sample (optimistic)": scores["tuned"],
                "plain 0.5": scores["plain"],
                "folds choosing the final setting": (
                    f"{stability['folds_agreeing']}/{stability['folds']}" if stability else ""
                ),
            }
        )
    return pd.DataFrame(rows)
