"""``python -m pipeline.evaluate``: the cross-validation report of one experiment.

Reads what the other stages saved (never retyped numbers): every segmentation fold's
out-of-fold prob store, ``metrics.json`` and ``history.csv``; when they exist, the
classifier's out-of-fold presence probs and histories, ``postprocess.json`` (tune) and
``predict.json``. One sequential pass over the OOF stores scores every image at three
stages, with ``PostprocessParams.apply`` on the stored uint8 probs so that the numbers
are the tuner's exactly:

- ``plain``: threshold 0.5, no minimum area, no gate;
- ``tuned``: the tuned threshold and minimum area without a gate (tune's "no gate"
  setting, as its ``extra.per_class.<class>.no_gate_params`` records it);
- ``gated``: the chosen setting of ``postprocess.json``, gate included.

Writes ``runs/<experiment>/report/``: ``report.md``, a self-contained ``report.html``,
``metrics.json``, ``scores_by_fold.csv``, ``scores_summary.csv`` and the PNGs.
Orchestration layer, yet TensorFlow-free.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pipeline.core import report
from pipeline.core.config import Config
from pipeline.core.folds import presence_matrix
from pipeline.core.images import (
    cache_path,
    read_image,
    read_image_size,
    read_original_sizes,
    resolve_image_path,
)
from pipeline.core.layout import (
    CLASSIFIER_STAGE,
    FIGURE_CONFUSION,
    FIGURE_ROC,
    FIGURE_SCORES,
    FIGURE_WORST,
    FOLD_METRICS,
    HISTORY,
    REPORT_HTML,
    REPORT_MD,
    REPORT_METRICS,
    SCORES_BY_FOLD,
    SCORES_SUMMARY,
)
from pipeline.core.layout import OOF_CLS as CLASSIFIER_OOF
from pipeline.core.layout import POSTPROCESS as POSTPROCESS_FILE
from pipeline.core.layout import PREDICT as PREDICT_FILE
from pipeline.core.layout import REPORT as REPORT_DIR
from pipeline.core.masks import truth_masks
from pipeline.core.postprocess import PostprocessParams, load_postprocess
from pipeline.core.probstore import ProbReader
from pipeline.run.cli import (
    add_config_arguments,
    add_force_argument,
    config_from_args,
    report_interrupted,
    setup_logging,
)
from pipeline.run.experiment import (
    Experiment,
    check_folds_finished,
    check_trained_config,
    open_experiment,
    read_json,
    write_json,
)
from pipeline.run.oof import open_segmentation_oof, read_classifier_oof

log = logging.getLogger(__name__)

# The names the other stages write under; repeated because importing them would
# import TensorFlow.
DEFAULT_WORST = 8

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
        panels.append(("truth", report.overlay(self.image, self.truth)))
        for stage, masks in self.masks.items():
            score = float(self.kaggle_dice[stage].mean())
            panels.append((f"{stage}: Kaggle Dice {score:.3f}", report.overlay(self.image, masks)))
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
    return [plain, Stage("tuned", tuned), Stage("gated", chosen)], extra


def open_run(config: Config) -> RunData:
    """Open a run for the report: the OOF stores (required) and whatever else exists."""
    exp = open_experiment(config)
    readers = open_segmentation_oof(config, exp)
    stages, extra = plan_stages(config, exp.classes)
    classifier, missing = read_classifier_oof(config, exp)
    notes = []
    if extra is None:
        notes.append(
            f"post-processing not available: run `python -m pipeline.tune --config "
            f"{config.source}` (only the plain threshold-0.5 stage is scored)"
        )
    if missing:
        notes.append(
            f"classifier OOF probs missing for folds {missing}: run `python -m "
            f"pipeline.train_classifier --config {config.source} --all`"
        )
    gated_by_classifier = [
        name for stage in stages for name, p in stage.params.items() if p.gate == "classifier"
    ]
    if gated_by_classifier and missing:
        raise FileNotFoundError(
            f"{config.run_dir / POSTPROCESS_FILE} gates {sorted(set(gated_by_classifier))} with "
            f"the classifier, but folds {missing} have no {CLASSIFIER_OOF}; run `python -m "
            f"pipeline.train_classifier --config {config.source} --all`"
        )
    try:
        sizes = read_original_sizes(cache_path(exp.cache_dir, "train", config.data.image_size))
    except FileNotFoundError:
        sizes = {}  # e.g. a run copied without its cache: sizes come from the image files
    return RunData(
        config, exp, readers, stages, extra, classifier, missing, notes, exp.rles(), sizes
    )


def score_oof(run: RunData, n_worst: int) -> tuple[pd.DataFrame, list[tuple[float, str, int]]]:
    """The streaming pass: (``ScoreAccumulator.counts()``, the ``n_worst`` images
    ``(mean Kaggle Dice at the last stage, image_id, fold)``, lowest first)."""
    names = [stage.name for stage in run.stages]
    accumulator = report.ScoreAccumulator(run.exp.classes, len(run.readers), names)
    worst = report.WorstImages(n_worst)
    clf = run.classifier_probs()
    params = [[stage.params[c] for c in run.exp.classes] for stage in run.stages]
    for fold, reader in enumerate(run.readers):
        for image_id, q in reader.iter():
            truth = run.truth(image_id, q.shape)
            for stage, stage_params in zip(names, params, strict=True):
                pred = report.predict_masks(q, stage_params, clf.get(image_id))
                dice = accumulator.add(stage, fold, truth, pred)
            worst.add(float(dice.mean()), image_id, fold)
    return accumulator.counts(), [(s, i, f) for s, i, f in worst.items()]


def load_oof_example(run: RunData, image_id: str) -> OofExample:
    """One OOF image with its truth, probs and masks at every stage of ``run``."""
    folds = [k for k, reader in enumerate(run.readers) if image_id in reader]
    if not folds:
        raise KeyError(f"image_id {image_id!r} is in no fold's OOF store of {run.config.run_dir}")
    fold = folds[0]
    q = np.asarray(run.readers[fold].get(image_id))
    truth = run.truth(image_id, q.shape)
    clf = run.classifier_probs().get(image_id)
    masks, dice = {}, {}
    for stage in run.stages:
        pred = report.predict_masks(q, [stage.params[c] for c in run.exp.classes], clf)
        one = report.ScoreAccumulator(run.exp.classes, 1, [stage.name])
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
        notes.append(f"prediction: not run (python -m pipeline.predict --config {config.source})")
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
            {"fold": str(k), **report.presence_auc(truth[folds == k], probs[folds == k], classes)}
        )
    rows.append({"fold": "pooled", **report.presence_auc(truth, probs, classes)})
    return pd.DataFrame(rows)


# Tune's names for the scores of the three stages in postprocess.json's extra.
TUNE_KEYS = {"plain": "plain", "tuned": "no_gate", "gated": "tuned"}
PER_FOLD_COLUMNS = ["fold", "class", "n_images", *report.METRIC_COLUMNS, "tp", "fp", "fn", "tn"]
POOLED_COLUMNS = ["class", "n_images", "tp", "fp", "fn", "tn", *report.METRIC_COLUMNS[3:]]
FOLD_FIGURES = ("fold", "n_val", "best_epoch", "epochs_run", "oof_kaggle_dice_050", "device")


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


def _score_sections(run: RunData, scores: Scores, out: Path) -> list[report.Section]:
    stages = [s.name for s in run.stages]
    bars = report.figure_stage_bars(scores.summary, stages)
    main = report.Section("Kaggle Dice per class and stage")
    main.tables.append(("", report.stage_table(scores.summary, scores.pooled, "kaggle_dice")))
    main.images.append(
        (
            "scores per class, error bars = std over folds",
            report.save_figure(bars, out / FIGURE_SCORES),
        )
    )
    spread = report.Section("Mean and standard deviation across folds")
    spread.tables += [(f"stage {s}", report.spread_table(scores.summary, s)) for s in stages]
    per_fold = report.Section("Per fold")
    by_fold = scores.by_fold
    per_fold.tables += [
        (f"stage {s}", by_fold[by_fold["stage"] == s][PER_FOLD_COLUMNS]) for s in stages
    ]
    presence = report.Section("Image-level presence, all folds pooled")
    pooled = scores.pooled
    presence.tables += [
        (f"stage {s}", pooled[pooled["stage"] == s][POOLED_COLUMNS]) for s in stages
    ]
    figure = report.figure_confusions(pooled, stages)
    presence.images.append(
        (
            "confusion matrices: rows truth, columns prediction",
            report.save_figure(figure, out / FIGURE_CONFUSION),
        )
    )
    return [main, spread, per_fold, presence]


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


def _cv_section(run: RunData) -> report.Section:
    section = report.Section("CV score")
    table = cv_scores(run.tune_extra)
    if table is None:
        section.paragraphs.append(
            f"not tuned yet: run `python -m pipeline.tune --config {run.config.source}`"
        )
        return section
    section.paragraphs.append(
        "Compare the leaderboard with the nested figure: each fold is scored with the "
        "post-processing chosen on the other folds' out-of-fold images. The in-sample "
        "figure chooses and scores on the same images, so it is optimistic by "
        "construction. The last column counts the folds whose own choice equals the final "
        "setting (tuned on all folds): a low count means an unstable setting."
    )
    section.tables.append(("Kaggle Dice, out of fold", table))
    return section


def _postprocess_section(
    run: RunData, check: pd.DataFrame | None, notes: list[str]
) -> report.Section:
    section = report.Section("Post-processing")
    if run.tune_extra is None:
        section.paragraphs.append(
            f"not available: run `python -m pipeline.tune --config {run.config.source}`"
        )
        return section
    rows = [
        {"stage": stage.name, "class": name, **params.to_dict()}
        for stage in run.stages[1:]
        for name, params in stage.params.items()
    ]
    section.tables.append(("settings (postprocess.json)", pd.DataFrame(rows).fillna("")))
    if check is not None:
        section.tables.append(("pooled Kaggle Dice recorded by tune vs recomputed here", check))
        if check["difference"].abs().max() > 1e-9:
            notes.append(
                "the recomputed scores differ from those tune recorded: were the OOF stores "
                "rewritten after tuning? Re-run python -m pipeline.tune"
            )
    return section


def _curves_section(run: RunData, out: Path) -> report.Section:
    config, n_folds = run.config, run.exp.n_folds
    section = report.Section("Training curves")
    for stage, name in (("", "segmentation"), (CLASSIFIER_STAGE, "classifier")):
        histories = {}
        for k in range(n_folds):
            path = config.fold_dir(k, stage) / HISTORY
            if path.is_file():
                histories[f"fold {k}"] = pd.read_csv(path)
        if histories:
            figure = report.figure_fold_histories(histories, name)
            path = report.save_figure(figure, out / f"curves_{name}.png")
            section.images.append((f"{name} folds", path))
    rows = [read_json(config.fold_dir(k) / FOLD_METRICS) for k in range(n_folds)]
    table = pd.DataFrame([{key: r.get(key, "") for key in FOLD_FIGURES} for r in rows])
    section.tables.append(("segmentation folds (metrics.json)", table))
    return section


def _classifier_section(run: RunData, auc: pd.DataFrame | None, out: Path) -> report.Section:
    section = report.Section("Classifier")
    classes = run.exp.classes
    if auc is None or run.classifier is None:
        section.paragraphs.append(
            "not available: run `python -m pipeline.train_classifier "
            f"--config {run.config.source} --all`"
        )
        return section
    folds = auc[auc["fold"] != "pooled"]
    spread = {c: report.mean_std(folds[c].mean(), folds[c].std(ddof=0)) for c in classes}
    table = pd.concat([auc, pd.DataFrame([{"fold": "mean ± std", **spread}])], ignore_index=True)
    section.tables.append(("ROC AUC of the OOF presence probs", table))
    presence = presence_matrix(run.exp.table, classes).set_index("image_id")
    truth = presence.loc[run.classifier["image_id"], classes].to_numpy(np.float64)
    figure = report.figure_roc(truth, run.classifier[classes].to_numpy(np.float64), classes)
    section.images.append(
        ("ROC curves, folds pooled", report.save_figure(figure, out / FIGURE_ROC))
    )
    if run.classifier_missing:
        section.paragraphs.append(f"folds {run.classifier_missing} have no classifier OOF yet")
    return section


def _worst_section(
    run: RunData, worst: Sequence[tuple[float, str, int]], out: Path
) -> report.Section:
    section = report.Section(f"Worst {len(worst)} out-of-fold images")
    section.paragraphs.append(
        f"Lowest mean Kaggle Dice over classes at stage {run.stages[-1].name}. Each row: "
        "the image, the truth, then each stage's masks."
    )
    if worst:
        examples = [load_oof_example(run, image_id) for _, image_id, _ in worst]
        figure = report.figure_overlays([e.panels() for e in examples], run.exp.classes)
        section.images.append(("worst OOF images", report.save_figure(figure, out / FIGURE_WORST)))
    return section


def _energy_section(config: Config, energy: pd.DataFrame, notes: list[str]) -> report.Section:
    e = config.energy
    section = report.Section("Energy and carbon (an estimate)")
    section.paragraphs.append(
        f"An estimate, not a measurement: kWh = seconds / 3600 x watts / 1000 x PUE {e.pue}, "
        f"with {e.cpu_watts} W for a run on CPU and {e.gpu_watts} W per GPU for a run on GPUs "
        "(host CPU, memory, idle time, tuning and this report are not counted); "
        f"g CO2e = kWh x {e.grid_g_co2_per_kwh} g/kWh. Assumptions: config energy.*."
    )
    section.paragraphs += notes
    section.tables.append(("recorded wall times", energy))
    return section


def _overview(run: RunData) -> report.Section:
    config, stages = run.config, [s.name for s in run.stages]
    size = config.data.submission_size
    where = f"submission size {list(size)}" if size is not None else "each image's own size"
    return report.Section(
        "Overview",
        paragraphs=[
            f"Experiment {config.experiment} ({config.source}); run directory {config.run_dir}; "
            f"made {datetime.datetime.now().isoformat(timespec='seconds')}.",
            f"{sum(map(len, run.readers))} training images scored out of fold at {where}: "
            f"{run.exp.n_folds} folds of {[len(r) for r in run.readers]} images; classes "
            f"{', '.join(run.exp.classes)}.",
            "Stages: " + "; ".join(f"{s}: {STAGE_TEXT[s]}" for s in stages) + ".",
            "Kaggle Dice: mean over images of 2|A∩B| / (|A| + |B|), 1 when both are empty. "
            "Pixel-level Dice and IoU sum intersections and areas over a fold's images first. "
            "A class is predicted present when its post-processed mask is non-empty. "
            "Mean ± std are over folds (population std, ddof 0); pooled = all OOF images "
            "together; row 'all' = every image-class pair.",
        ],
    )


def evaluate(config: Config, n_worst: int = DEFAULT_WORST, force: bool = False) -> dict[str, Any]:
    """Score every fold's OOF predictions and write the report; returns metrics.json's content.

    FileNotFoundError names an unfinished segmentation fold and the command to run;
    missing classifier, tuning or prediction outputs become notes in the report.
    ``force``: go on although this config differs from the folds' training config.
    """
    check_folds_finished(config)
    check_trained_config(config, force)
    run = open_run(config)
    out = config.run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    log.info("scoring the OOF images at stages %s", [s.name for s in run.stages])
    counts, worst = score_oof(run, n_worst)
    by_fold = report.score_table(counts)
    pooled = report.score_table(counts, pooled=True)
    scores = Scores(by_fold, pooled, report.summarise_folds(by_fold), worst)
    by_fold.to_csv(out / SCORES_BY_FOLD, index=False)
    scores.summary.to_csv(out / SCORES_SUMMARY, index=False)
    notes = list(run.notes)
    check = tune_check(run, pooled)
    cv = cv_scores(run.tune_extra)
    auc = classifier_auc(run)
    runs, energy_notes = timed_runs(config, run.exp.n_folds)
    energy = report.energy_table(runs, config.energy)
    sections = [
        _overview(run),
        _cv_section(run),
        *_score_sections(run, scores, out),
        _postprocess_section(run, check, notes),
        _curves_section(run, out),
        _classifier_section(run, auc, out),
        _worst_section(run, worst, out),
        _energy_section(config, energy, energy_notes),
    ]
    if notes:
        sections.append(report.Section("Notes", paragraphs=notes))
    title = f"CV report: {config.experiment}"
    _write_text(out / REPORT_MD, report.render_markdown(title, sections))
    _write_text(out / REPORT_HTML, report.render_html(title, sections))
    metrics = report.json_ready(
        {
            "experiment": config.experiment,
            "config": config.source,
            "classes": run.exp.classes,
            "n_folds": run.exp.n_folds,
            "fold_sizes": [len(r) for r in run.readers],
            "stages": {
                s.name: {"description": STAGE_TEXT[s.name]}
                | {"params": {c: p.to_dict() for c, p in s.params.items()}}
                for s in run.stages
            },
            "cv": None if cv is None else cv.to_dict(orient="records"),
            "summary": _nested_summary(scores),
            "per_fold": by_fold.to_dict(orient="records"),
            "pooled": pooled.to_dict(orient="records"),
            "tune_check": None if check is None else check.to_dict(orient="records"),
            "classifier_auc": None if auc is None else auc.to_dict(orient="records"),
            "worst_images": [{"image_id": i, "fold": f, "kaggle_dice": s} for s, i, f in worst],
            "energy": {"assumptions": config.energy.to_dict()}
            | {"runs": energy.to_dict(orient="records"), "notes": energy_notes},
            "notes": notes,
            "report": str(out / REPORT_HTML),
        }
    )
    write_json(out / REPORT_METRICS, metrics)
    log.info("wrote the report to %s", out)
    return metrics


def load_report(config: Config, refresh: bool = False) -> dict[str, Any]:
    """The saved ``report/metrics.json``, made first by ``evaluate`` if absent or ``refresh``."""
    path = config.run_dir / REPORT_DIR / REPORT_METRICS
    if refresh or not path.is_file():
        return evaluate(config)
    return read_json(path, "make it with python -m pipeline.evaluate")


def _nested_summary(scores: Scores) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """stage -> class -> metric -> {mean, std, pooled}."""
    pooled = scores.pooled.set_index(["stage", "class"])
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for row in scores.summary.to_dict(orient="records"):
        key = (row["stage"], row["class"])
        out.setdefault(row["stage"], {})[row["class"]] = {
            m: {"mean": row[f"{m}_mean"], "std": row[f"{m}_std"], "pooled": pooled.loc[key, m]}
            for m in report.METRIC_COLUMNS
        }
    return out


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def format_summary(metrics: Mapping[str, Any]) -> str:
    """The printed summary: Kaggle Dice mean ± std over folds per class and stage."""
    stages = list(metrics["summary"])
    lines = [
        f"Kaggle Dice, mean ± std over {metrics['n_folds']} folds",
        f"{'class':<14}" + "".join(f"{s:>20}" for s in stages),
    ]
    for name in [*metrics["classes"], report.ALL_CLASSES]:
        cells = [metrics["summary"][s][name]["kaggle_dice"] for s in stages]
        lines.append(
            f"{name:<14}" + "".join(f"{report.mean_std(c['mean'], c['std']):>20}" for c in cells)
        )
    lines += [f"note: {note}" for note in metrics["notes"]]
    lines.append(f"report: {metrics['report']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument(
        "--worst",
        type=int,
        default=DEFAULT_WORST,
        help="how many of the worst OOF images to draw (default: %(default)s)",
    )
    add_force_argument(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        metrics = evaluate(config_from_args(args), n_worst=args.worst, force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return report_interrupted("python -m pipeline.evaluate")
    print(format_summary(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
