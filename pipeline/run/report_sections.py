"""The CV report's sections: tables, paragraphs and saved figures per topic (run layer).

Each builder turns what ``report_data`` read and computed into a ``report.Section``
(overview, CV score, scores per stage, post-processing, training curves, classifier,
worst images, energy), writing its PNGs into the report folder. Pure: never imports
TensorFlow.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import report, report_figures
from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.fingerprint import fingerprint_path, fingerprint_tables
from pipeline.core.folds import presence_matrix
from pipeline.core.layout import (
    CLASSIFIER_STAGE,
    FIGURE_CONFUSION,
    FIGURE_ROC,
    FIGURE_SCORES,
    FIGURE_WORST,
    FOLD_METRICS,
    HISTORY,
)
from pipeline.core.report_scores import METRIC_COLUMNS
from pipeline.run.json_files import read_json
from pipeline.run.report_data import STAGE_TEXT, RunData, Scores, cv_scores, load_oof_example

PER_FOLD_COLUMNS = ["fold", "class", "n_images", *METRIC_COLUMNS, "tp", "fp", "fn", "tn"]
POOLED_COLUMNS = ["class", "n_images", "tp", "fp", "fn", "tn", *METRIC_COLUMNS[3:]]
FOLD_FIGURES = ("fold", "n_val", "best_epoch", "epochs_run", "oof_kaggle_dice_050", "device")


def score_sections(run: RunData, scores: Scores, out: Path) -> list[report.Section]:
    """Scores per class and stage, their spread over folds, per fold, and presence."""
    stages = [s.name for s in run.stages]
    bars = report_figures.figure_stage_bars(scores.summary, stages)
    main = report.Section("Kaggle Dice per class and stage")
    main.tables.append(("", report.stage_table(scores.summary, scores.pooled, "kaggle_dice")))
    main.images.append(
        (
            "scores per class, error bars = std over folds",
            report_figures.save_figure(bars, out / FIGURE_SCORES),
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
    figure = report_figures.figure_confusions(pooled, stages)
    presence.images.append(
        (
            "confusion matrices: rows truth, columns prediction",
            report_figures.save_figure(figure, out / FIGURE_CONFUSION),
        )
    )
    return [main, spread, per_fold, presence]


def pixel_confusion_section(run: RunData, confusion: np.ndarray) -> report.Section:
    """A softmax run's pixel confusion matrix over the classes (background included,
    void pixels left out), all folds pooled, at the last stage: counts and row shares."""
    labels = ["background", *run.exp.classes]
    counts = pd.DataFrame(confusion, columns=labels)
    counts.insert(0, "truth / prediction", labels)
    totals = confusion.sum(axis=1, keepdims=True)
    shares = pd.DataFrame(np.round(np.divide(confusion, np.maximum(totals, 1)), 4), columns=labels)
    shares.insert(0, "truth / prediction", labels)
    stage = run.stages[-1].name
    return report.Section(
        "Pixel confusion matrix",
        paragraphs=[
            f"model.activation softmax: every out-of-fold pixel's true class (rows) against "
            f"the class of the stage-{stage} masks (columns), all folds pooled; void pixels "
            f"({len(run.exp.void)} images hold some) are not counted."
        ],
        tables=[("pixels", counts), ("share of each true class", shares)],
    )


def cv_section(run: RunData) -> report.Section:
    """The CV figures tune recorded (nested, in-sample, plain), or how to make them."""
    section = report.Section("CV score")
    table = cv_scores(run.tune_extra)
    if table is None:
        section.paragraphs.append(
            f"not tuned yet: run `{command_line('tune', config=run.config.source)}`"
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


def postprocess_section(
    run: RunData, check: pd.DataFrame | None, notes: list[str]
) -> report.Section:
    """The tuned settings and tune's pooled scores next to the ones recomputed here."""
    section = report.Section("Post-processing")
    if run.tune_extra is None:
        section.paragraphs.append(
            f"not available: run `{command_line('tune', config=run.config.source)}`"
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
                f"rewritten after tuning? Re-run {command_line('tune', config=run.config.source)}"
            )
    return section


def curves_section(run: RunData, out: Path) -> report.Section:
    """Every fold's training curves (segmentation, classifier) and metrics.json figures."""
    config, n_folds = run.config, run.exp.n_folds
    section = report.Section("Training curves")
    for stage, name in (("", "segmentation"), (CLASSIFIER_STAGE, "classifier")):
        histories = {}
        for k in range(n_folds):
            path = config.fold_dir(k, stage) / HISTORY
            if path.is_file():
                histories[f"fold {k}"] = pd.read_csv(path)
        if histories:
            figure = report_figures.figure_fold_histories(histories, name)
            path = report_figures.save_figure(figure, out / f"curves_{name}.png")
            section.images.append((f"{name} folds", path))
    rows = [read_json(config.fold_dir(k) / FOLD_METRICS) for k in range(n_folds)]
    table = pd.DataFrame([{key: r.get(key, "") for key in FOLD_FIGURES} for r in rows])
    section.tables.append(("segmentation folds (metrics.json)", table))
    return section


def classifier_section(run: RunData, auc: pd.DataFrame | None, out: Path) -> report.Section:
    """The classifier's OOF ROC AUC per fold and pooled, and its ROC curves."""
    section = report.Section("Classifier")
    classes = run.exp.classes
    if auc is None or run.classifier is None:
        section.paragraphs.append(
            "not available: run "
            f"`{command_line('train-classifier', '--all', config=run.config.source)}`, or "
            "train the folds with model.classification_head=true"
        )
        return section
    folds = auc[auc["fold"] != "pooled"]
    spread = {c: report.mean_std(folds[c].mean(), folds[c].std(ddof=0)) for c in classes}
    table = pd.concat([auc, pd.DataFrame([{"fold": "mean ± std", **spread}])], ignore_index=True)
    if run.presence_source == "head":
        section.paragraphs.append(
            "presence from the segmentation model's presence head "
            "(model.classification_head); no separate classifier was trained"
        )
    section.tables.append(("ROC AUC of the OOF presence probs", table))
    presence = presence_matrix(run.exp.table, classes).set_index("image_id")
    truth = presence.loc[run.classifier["image_id"], classes].to_numpy(np.float64)
    figure = report_figures.figure_roc(truth, run.classifier[classes].to_numpy(np.float64), classes)
    section.images.append(
        ("ROC curves, folds pooled", report_figures.save_figure(figure, out / FIGURE_ROC))
    )
    if run.classifier_missing:
        section.paragraphs.append(f"folds {run.classifier_missing} have no presence OOF yet")
    return section


def worst_section(
    run: RunData, worst: Sequence[tuple[float, str, int]], out: Path
) -> report.Section:
    """The worst OOF images: image, truth and every stage's masks."""
    section = report.Section(f"Worst {len(worst)} out-of-fold images")
    section.paragraphs.append(
        f"Lowest mean Kaggle Dice over classes at stage {run.stages[-1].name}. Each row: "
        "the image, the truth, then each stage's masks."
    )
    if worst:
        examples = [load_oof_example(run, image_id) for _, image_id, _ in worst]
        figure = report_figures.figure_overlays([e.panels() for e in examples], run.exp.classes)
        section.images.append(
            ("worst OOF images", report_figures.save_figure(figure, out / FIGURE_WORST))
        )
    return section


def energy_section(config: Config, energy: pd.DataFrame, notes: list[str]) -> report.Section:
    """The energy and CO2e estimate of the recorded wall times, with its assumptions."""
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


def plan_section(config: Config) -> report.Section | None:
    """The data set's fingerprint and the planned choices, when the config was planned
    (``foldseg plan`` left ``<config>.fingerprint.json`` beside it)."""
    if not config.source:
        return None
    path = fingerprint_path(config.source)
    if not path.is_file():
        return None
    try:
        lines, per_class, choices = fingerprint_tables(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return report.Section("Plan", paragraphs=[f"{path} could not be read: {exc}"])
    section = report.Section("Plan: the data's fingerprint", paragraphs=[f"From {path}.", *lines])
    section.tables.append(("per class (object areas in pixels at the image's own size)", per_class))
    section.tables.append(("the planned keys and why", choices))
    return section


def overview_section(run: RunData) -> report.Section:
    """What was scored, at which stages, and how the metrics are defined."""
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
