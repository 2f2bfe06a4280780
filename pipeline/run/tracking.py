"""Experiment tracking: what a run has on disk, logged to MLflow (pure run layer).

With ``tracking.backend: mlflow`` every stage logs to one MLflow run per experiment
(found again by its run directory, so that every stage, process and resumed fold
reattaches to it), with a nested run per segmentation and classifier fold (its id kept
in the fold directory, so that a resumed fold continues its run). With ``none`` (the
default) ``open_tracker`` returns a ``Tracker`` that does nothing and MLflow is never
imported; ``run.mlflow_tracker`` is the only module that imports it.

Tracking is never in the way: a store that cannot be reached or written is reported once,
as a warning, and the stage goes on; ``foldseg track`` uploads the run afterwards. The
``record_*`` functions log what a stage left on disk; a stage calls its own at its end,
and ``foldseg track`` calls them all. Logging twice logs nothing new: epochs already
logged are skipped and a summary figure is logged only when it changed.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.commands import command_line
from pipeline.core.config import Config
from pipeline.core.layout import (
    CLASSIFIER_STAGE,
    CURVES,
    FOLD_METRICS,
    HISTORY,
    POSTPROCESS,
    PREDICT,
    REPORT,
    REPORT_HTML,
    REPORT_MD,
    REPORT_METRICS,
    TRACKING_DB,
)
from pipeline.run.json_files import read_json
from pipeline.run.tracker import (
    NULL_TRACKER,
    TAG_EXPERIMENT,
    TAG_KIND,
    TAG_MEMBERS,
    TAG_PARENT,
    Tracker,
)

log = logging.getLogger(__name__)

_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


def tracking_uri(config: Config) -> str:
    """``tracking.uri``, or the SQLite store ``<runs_dir>/mlflow.db`` (absolute)."""
    if config.tracking.uri:
        return config.tracking.uri
    return "sqlite:///" + str((Path(config.runs_dir) / TRACKING_DB).resolve())


def open_tracker(config: Config) -> Tracker:
    """The experiment's tracker: a do-nothing ``Tracker`` unless ``tracking.backend`` is
    ``mlflow``; then its MLflow run (created on first use). A store that cannot be used is
    reported once and a do-nothing tracker returned."""
    if config.tracking.backend == "none":
        return NULL_TRACKER
    from pipeline.run import mlflow_tracker  # only when tracking is on: it imports mlflow

    return mlflow_tracker.open_run(
        tracking_uri(config),
        config.tracking.experiment,
        config.experiment,
        config.run_dir,
        retry_hint=command_line("track", config=config.source),
    )


@contextmanager
def tracked(config: Config) -> Iterator[Tracker]:
    """``open_tracker`` as a context: the run is marked failed if the block raises."""
    tracker = open_tracker(config)
    try:
        yield tracker
    except BaseException:
        tracker.finish(failed=True)
        raise
    tracker.finish()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_params(config: Config) -> dict[str, str]:
    """The whole typed config as MLflow params: dotted keys, values as YAML spells them."""
    out = {}
    for key, value in flatten(config.to_dict()).items():
        text = "null" if value is None else str(value)
        out[key] = text
    return out


def numeric(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested mapping (booleans left out), with metric-safe
    dotted names; lists of numbers become ``name.0``, ``name.1``, ..."""
    out: dict[str, float] = {}
    for key, value in flatten(data, prefix).items():
        name = _METRIC_NAME.sub("_", key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, list) and value and all(_is_number(v) for v in value):
            out.update({f"{name}.{i}": float(v) for i, v in enumerate(value)})
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def record_config(tracker: Tracker, config: Config) -> None:
    """The config as params, the experiment's name and source as tags."""
    if not tracker.enabled:
        return
    tracker.log_params(config_params(config))
    tags = {"foldseg.config": config.source or "", TAG_EXPERIMENT: config.experiment}
    if config.data.pseudo_labels is not None:
        # Links this run to the round that made its labels (that run's directory).
        table = Path(config.data.pseudo_labels).resolve()
        tags |= {
            "foldseg.pseudo_labels": str(table),
            "foldseg.pseudo_labels_run": str(table.parent),
        }
    tracker.set_tags(tags)


def record_fold(
    tracker: Tracker, stage: str, fold: int, fold_dir: Path, run: Tracker | None = None
) -> None:
    """One fold's history (per-epoch figures and the learning rate), summary
    (``metrics.json``) and curves, in its nested run (``run``, else the one the fold
    directory names); its headline figures in the experiment's run as
    ``<stage>.fold_<k>.<figure>``. ``stage``: ``segmentation`` or ``classifier``."""
    if not tracker.enabled or not (fold_dir / HISTORY).is_file():
        return
    if run is None:
        run = tracker.fold(stage, fold, fold_dir, resume=True)
    history = pd.read_csv(fold_dir / HISTORY)
    run.log_history([{str(k): v for k, v in row.items()} for row in history.to_dict("records")])
    for name in (HISTORY, CURVES, FOLD_METRICS):
        if (fold_dir / name).is_file():
            run.log_artifact(fold_dir / name)
    if (fold_dir / FOLD_METRICS).is_file():
        summary = numeric(read_json(fold_dir / FOLD_METRICS))
        run.log_metrics(summary)
        run.finish()
        headline = {k: v for k, v in summary.items() if k.startswith(("oof_", "best_"))}
        tracker.log_metrics({f"{stage}.fold_{fold}.{k}": v for k, v in headline.items()})


def record_folds(tracker: Tracker, config: Config) -> None:
    """Every fold on disk, segmentation and classifier (``record_fold``)."""
    for stage, folder in (("segmentation", ""), ("classifier", CLASSIFIER_STAGE)):
        for k in range(config.folds.n_splits):
            record_fold(tracker, stage, k, config.fold_dir(k, folder))


def record_tune(tracker: Tracker, config: Config) -> None:
    """The tuned post-processing's CV figures, labelled: ``cv.plain`` (threshold 0.5),
    ``cv.tuned_in_sample`` (chosen and scored on the same OOF images: optimistic),
    ``cv.tuned_nested`` (each fold scored with the setting the other folds chose), their
    per-class and per-fold figures; ``postprocess.json`` as an artifact."""
    path = config.run_dir / POSTPROCESS
    if not tracker.enabled or not path.is_file():
        return
    extra = read_json(path).get("extra", {})
    scores = dict(extra.get("scores", {}))
    if "tuned" in scores:
        scores["tuned_in_sample"] = scores.pop("tuned")
    figures = numeric(scores, "cv.")
    for name, per_class in extra.get("per_class", {}).items():
        picked = {k: per_class.get(k) for k in ("plain", "tuned", "tuned_nested")}
        picked["tuned_in_sample"] = picked.pop("tuned")
        figures.update(numeric(picked, f"cv.class.{name}."))
    tracker.log_metrics(figures)
    tracker.log_artifact(path)


def record_predict(tracker: Tracker, config: Config) -> None:
    """predict's timings, precision, test score (when the truth is known) and
    submission path (``predict.json``, also an artifact)."""
    path = config.run_dir / PREDICT
    if not tracker.enabled or not path.is_file():
        return
    result = read_json(path)
    figures = numeric(
        {
            key: result.get(key)
            for key in ("seconds", "cpu_seconds", "stage_seconds", "n_images", "folds")
        },
        "predict.",
    )
    if result.get("test_score") is not None:
        figures["test.kaggle_dice"] = float(result["test_score"])
    tracker.log_metrics(figures)
    tracker.set_tags(
        {
            "predict.precision": str(result.get("precision")),
            "predict.device": str(result.get("device")),
            "predict.submission": str(result.get("submission")),
        }
    )
    tracker.log_artifact(path)


def record_evaluate(tracker: Tracker, config: Config) -> None:
    """The report (Markdown, HTML and its figures as artifacts) and its energy estimate
    (``energy.<run>.seconds`` / ``.kwh`` / ``.g_co2e`` per recorded run and ``total``)."""
    report = config.run_dir / REPORT
    if not tracker.enabled or not (report / REPORT_METRICS).is_file():
        return
    metrics = read_json(report / REPORT_METRICS)
    figures: dict[str, float] = {}
    for row in metrics.get("energy", {}).get("runs", []):
        kept = {k: row.get(k) for k in ("seconds", "kwh", "g_co2e")}
        figures.update(numeric(kept, f"energy.{row.get('run')}."))
    tracker.log_metrics(figures)
    for path in sorted(report.iterdir()):
        if path.is_file() and (path.suffix == ".png" or path.name in (REPORT_MD, REPORT_HTML)):
            tracker.log_artifact(path, REPORT)


def record_run(tracker: Tracker, config: Config) -> None:
    """Everything of the experiment on disk (what ``foldseg track`` uploads)."""
    record_config(tracker, config)
    record_folds(tracker, config)
    record_tune(tracker, config)
    record_predict(tracker, config)
    record_evaluate(tracker, config)


def link_members(tracker: Tracker, kind: str, members: Sequence[Config], nest: bool) -> None:
    """A grid or an ensemble (``kind``) and its member experiments: the run of ``tracker``
    is tagged with its kind and the members' run directories; each member's run is
    uploaded (``record_run``: whatever it missed) and tagged ``foldseg.<kind>`` with the
    run directory of ``tracker``'s run; with ``nest`` it is nested under it (a grid's
    points, so that the UI lists and compares them together)."""
    if not tracker.enabled:
        return
    where = ",".join(str(m.run_dir.resolve()) for m in members)
    tracker.set_tags({TAG_KIND: kind, TAG_MEMBERS: where})
    own = tracker.run_dir
    for member in members:
        with tracked(member) as run:
            record_run(run, member)
            tags = {f"foldseg.{kind}": str(own)}
            if nest and tracker.run_id is not None:
                tags[TAG_PARENT] = tracker.run_id
            run.set_tags(tags)


def record_pseudo_labels(tracker: Tracker, config: Config, summary: Mapping[str, Any]) -> None:
    """A pseudo-label round in the run that made it: how many test images were kept
    (``pseudo_label.kept_images``, per class present/absent) and the table's path; an
    experiment trained on them names it (``record_config``: ``foldseg.pseudo_labels``)."""
    if not tracker.enabled:
        return
    kept = {k: summary.get(k) for k in ("test_images", "kept_images", "per_class")}
    tracker.log_metrics(numeric(kept, "pseudo_label."))
    tracker.set_tags({"pseudo_label.table": str(summary.get("table"))})
