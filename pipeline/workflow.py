"""``foldseg run``: every stage in order for one config, skipping what is done.

The stages, each resuming or skipping work already done (so a re-run after an
interruption or a failure continues where it stopped): the embedded demo data when the
config's data set is the demo (``data.demo``), the split and every segmentation fold,
every classifier fold (when a post-processing gate reads the classifier), the
post-processing tuned on the out-of-fold predictions, the prediction into a validated
submission (scored when ``data.test_truth`` is set; reused when nothing changed since the
last one) and the CV report. It prints the headline figures.

``make demo`` is ``foldseg run --config configs/demo.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.config import Config
from pipeline.core.layout import REPORT_HTML, report_dir
from pipeline.core.postprocess import CLASSIFIER_GATES
from pipeline.evaluate import evaluate
from pipeline.make_demo_data import DEFAULTS as DEMO_DEFAULTS
from pipeline.make_demo_data import make_demo_data
from pipeline.nn.fold_trainer import run_parallel
from pipeline.predict import predict
from pipeline.run.command import (
    Command,
    add_submissions_dir_argument,
    config_from_args,
)
from pipeline.run.fold_jobs import use_fold_jobs
from pipeline.run.prediction import previous_prediction
from pipeline.run.process import exit_process
from pipeline.run.tune_output import format_summary
from pipeline.train import segmentation_jobs, train_folds
from pipeline.train_classifier import classifier_jobs, score_all_folds, train_classifier_folds
from pipeline.tune import tune

log = logging.getLogger(__name__)


def run_workflow(config: Config, submissions_dir: Path = Path("submissions")) -> dict[str, Any]:
    """Run every stage of ``config`` in order; return the headline figures.

    Each stage skips or resumes what is done, so calling it again continues an
    interrupted run and changes nothing once everything is done.
    """
    timings: dict[str, float] = {}

    def timed(name: str, stage: Callable[[], Any]) -> Any:
        started = time.monotonic()
        result = stage()
        timings[name] = round(time.monotonic() - started, 1)
        log.info("stage %s took %.0f s", name, timings[name])
        return result

    if config.data.demo:
        timed("data", lambda: _make_demo_data(config))
    folds = list(range(config.folds.n_splits))
    with_classifier = any(gate in CLASSIFIER_GATES for gate in config.postprocess.gates)
    if not with_classifier:
        log.info("no post-processing gate reads the classifier: it is not trained")
    n_jobs = len(folds) * (2 if with_classifier else 1)
    if use_fold_jobs(config, n_jobs):
        # Both stages' folds in one pool, so no worker idles between the stages.
        jobs = segmentation_jobs(config, folds)
        sizes = [config.data.image_size]
        if with_classifier:
            jobs += classifier_jobs(config, folds)
            sizes.append(config.classifier.image_size)
        timed("folds", lambda: run_parallel(config, jobs, sizes, resume=True, force=False))
    seg = timed("segmentation", lambda: train_folds(config, folds, resume=True))
    cls: list[dict[str, Any]] = []
    pooled: dict[str, Any] = {"oof_auc_per_class": {}}
    if with_classifier:
        cls = timed("classifier", lambda: train_classifier_folds(config, folds, resume=True))
        if cls:
            pooled = score_all_folds(config, folds)
    tuned = timed("tune", lambda: tune(config))
    print(format_summary(tuned))
    submission = previous_prediction(config)
    if submission is not None:
        log.info("nothing changed since the last prediction: reusing %s", submission["submission"])
    else:
        submission = timed("predict", lambda: predict(config, submissions_dir=submissions_dir))
    timed("evaluate", lambda: evaluate(config))
    oof_plain = sum(r["oof_kaggle_dice_050"] for r in seg) / len(seg)
    return {
        "oof_kaggle_dice_050": round(oof_plain, 4),
        "oof_tuned": round(tuned.oof_scores()[0], 4),
        "oof_tuned_nested": round(tuned.oof_scores()[1], 4),
        # Pooled: every OOF image of every fold in one ranking (stricter than the mean of
        # the per-fold AUCs, which forgives folds calibrated differently).
        "classifier_auc_pooled": {k: round(v, 4) for k, v in pooled["oof_auc_per_class"].items()},
        "classifier_auc_fold_mean": {
            name: round(sum(r["oof_auc_per_class"][name] for r in cls) / len(cls), 4)
            for name in pooled["oof_auc_per_class"]
        },
        "test_score": submission.get("test_score"),
        "submission": str(submission.get("submission")),
        "report": str(report_dir(config.run_dir) / REPORT_HTML),
        "timings_s": timings,
    }


def _make_demo_data(config: Config) -> None:
    """The demo data set in the folder of ``data.train_csv``, its test truth at the
    submission size (made once; an intact set is kept)."""
    size = config.data.submission_size
    if size is None:
        raise ValueError("data.demo needs data.submission_size: the demo's truth has one size")
    if config.data.train_csv is None:
        raise ValueError("data.demo needs data.train_csv: the demo data is written beside it")
    settings = {**DEMO_DEFAULTS, "truth_size": (size[0], size[1])}
    make_demo_data(out=Path(config.data.train_csv).parent, **settings)


def format_figures(figures: dict[str, Any], seconds: float) -> str:
    """The lines ``foldseg run`` prints: the OOF, tuned and test figures, where things are."""
    lines = [
        f"segmentation OOF Kaggle Dice at threshold 0.5: {figures['oof_kaggle_dice_050']:.4f}",
        f"OOF Kaggle Dice after tuned post-processing:  nested {figures['oof_tuned_nested']:.4f}"
        f" (honest), in-sample {figures['oof_tuned']:.4f}",
    ]
    for label, key in (
        ("pooled", "classifier_auc_pooled"),
        ("fold mean", "classifier_auc_fold_mean"),
    ):
        if figures[key]:
            aucs = ", ".join(f"{k} {v:.3f}" for k, v in figures[key].items())
            lines.append(f"classifier OOF AUC per class ({label}): {aucs}")
    if figures["test_score"] is not None:
        lines.append(f"test Kaggle Dice of the submission:           {figures['test_score']:.4f}")
    lines.append(f"submission: {figures['submission']}")
    lines.append(f"report: {figures['report']}")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in figures["timings_s"].items())
    lines.append(f"time: {seconds:.0f} s ({stages})")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    figures = run_workflow(config_from_args(args), args.submissions_dir)
    print(format_figures(figures, time.monotonic() - started))
    return 0


COMMAND = Command(
    stage="run",
    description=__doc__,
    add_arguments=add_submissions_dir_argument,
    run=_run,
    examples=(
        "--config configs/demo.yaml",
        "--config configs/demo.yaml --set jobs.executor=ray",
    ),
    resume="",
)

main = COMMAND.main


if __name__ == "__main__":
    exit_process(main())
