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
Orchestration layer, yet TensorFlow-free: this module composes the report; what it
reads from the run and the numbers are ``pipeline.run.report_data``, the sections
``pipeline.run.report_sections``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.core import report
from pipeline.core.atomic import write_csv, write_text
from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.energy import energy_table
from pipeline.core.layout import REPORT as REPORT_DIR
from pipeline.core.layout import (
    REPORT_HTML,
    REPORT_MD,
    REPORT_METRICS,
    SCORES_BY_FOLD,
    SCORES_SUMMARY,
)
from pipeline.core.report_scores import ALL_CLASSES, METRIC_COLUMNS, score_table, summarise_folds
from pipeline.run.command import Command, add_force_argument, config_from_args
from pipeline.run.fold_records import check_folds_finished, check_trained_config
from pipeline.run.json_files import read_json, write_json
from pipeline.run.report_data import (
    STAGE_TEXT,
    Scores,
    classifier_auc,
    cv_scores,
    open_run,
    score_oof,
    timed_runs,
    tune_check,
)
from pipeline.run.report_sections import (
    classifier_section,
    curves_section,
    cv_section,
    energy_section,
    overview_section,
    pixel_confusion_section,
    plan_section,
    postprocess_section,
    score_sections,
    worst_section,
)
from pipeline.run.tracking import record_evaluate, tracked

log = logging.getLogger(__name__)

DEFAULT_WORST = 8


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
    n_labels = len(run.exp.classes) + 1
    confusion = np.zeros((n_labels, n_labels), np.int64) if run.exclusive else None
    counts, worst = score_oof(run, n_worst, confusion)
    by_fold = score_table(counts)
    pooled = score_table(counts, pooled=True)
    scores = Scores(by_fold, pooled, summarise_folds(by_fold), worst)
    write_csv(out / SCORES_BY_FOLD, by_fold)
    write_csv(out / SCORES_SUMMARY, scores.summary)
    notes = list(run.notes)
    check = tune_check(run, pooled)
    cv = cv_scores(run.tune_extra)
    auc = classifier_auc(run)
    runs, energy_notes = timed_runs(config, run.exp.n_folds)
    energy = energy_table(runs, config.energy.to_dict())
    sections = [
        overview_section(run),
        cv_section(run),
        *score_sections(run, scores, out),
        *([] if confusion is None else [pixel_confusion_section(run, confusion)]),
        postprocess_section(run, check, notes),
        curves_section(run, out),
        classifier_section(run, auc, out),
        worst_section(run, worst, out),
        energy_section(config, energy, energy_notes),
        *[section for section in [plan_section(config)] if section is not None],
    ]
    if notes:
        sections.append(report.Section("Notes", paragraphs=notes))
    title = f"CV report: {config.experiment}"
    write_text(out / REPORT_MD, report.render_markdown(title, sections))
    write_text(out / REPORT_HTML, report.render_html(title, sections))
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
            "pixel_confusion": None
            if confusion is None
            else {
                "labels": ["background", *run.exp.classes],
                "rows": "truth",
                "columns": "prediction",
                "counts": confusion.tolist(),
            },
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
    with tracked(config) as tracker:
        record_evaluate(tracker, config)
    return metrics


def load_report(config: Config, refresh: bool = False) -> dict[str, Any]:
    """The saved ``report/metrics.json``, made first by ``evaluate`` if absent or ``refresh``."""
    path = config.run_dir / REPORT_DIR / REPORT_METRICS
    if refresh or not path.is_file():
        return evaluate(config)
    return read_json(path, f"make it with {command_line('evaluate', config=config.source)}")


def _nested_summary(scores: Scores) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """stage -> class -> metric -> {mean, std, pooled}."""
    pooled = scores.pooled.set_index(["stage", "class"])
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for row in scores.summary.to_dict(orient="records"):
        key = (row["stage"], row["class"])
        out.setdefault(row["stage"], {})[row["class"]] = {
            m: {"mean": row[f"{m}_mean"], "std": row[f"{m}_std"], "pooled": pooled.loc[key, m]}
            for m in METRIC_COLUMNS
        }
    return out


def format_summary(metrics: Mapping[str, Any]) -> str:
    """The printed summary: Kaggle Dice mean ± std over folds per class and stage."""
    stages = list(metrics["summary"])
    lines = [
        f"Kaggle Dice, mean ± std over {metrics['n_folds']} folds",
        f"{'class':<14}" + "".join(f"{s:>20}" for s in stages),
    ]
    for name in [*metrics["classes"], ALL_CLASSES]:
        cells = [metrics["summary"][s][name]["kaggle_dice"] for s in stages]
        lines.append(
            f"{name:<14}" + "".join(f"{report.mean_std(c['mean'], c['std']):>20}" for c in cells)
        )
    lines += [f"note: {note}" for note in metrics["notes"]]
    lines.append(f"report: {metrics['report']}")
    return "\n".join(lines)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--worst",
        type=int,
        default=DEFAULT_WORST,
        help="how many of the worst OOF images to draw (default: %(default)s)",
    )
    add_force_argument(parser)


def _run(args: argparse.Namespace) -> int:
    metrics = evaluate(config_from_args(args), n_worst=args.worst, force=args.force)
    print(format_summary(metrics))
    return 0


COMMAND = Command(
    stage="evaluate",
    description=__doc__,
    add_arguments=_add_arguments,
    run=_run,
    examples=("--config configs/demo.yaml", "--config configs/demo.yaml --worst 24"),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
