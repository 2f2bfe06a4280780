"""``python -m pipeline.demo``: the whole pipeline on the embedded demo data.

Stages run in order, each skipping work already done (idempotent): demo data, the
split and every segmentation fold, every classifier fold, post-processing tuned on the
out-of-fold predictions, prediction into a validated submission scored against the
demo's hidden test truth, and the CV report.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline import make_demo_data
from pipeline.core.config import Config
from pipeline.core.layout import REPORT_HTML, report_dir
from pipeline.evaluate import evaluate
from pipeline.nn.fold_trainer import run_parallel
from pipeline.predict import predict
from pipeline.run.cli import (
    add_config_arguments,
    config_from_args,
    report_interrupt,
    setup_logging,
    sigterm_as_interrupt,
)
from pipeline.run.fold_jobs import FoldJobFailed, use_fold_jobs
from pipeline.run.prediction import previous_prediction
from pipeline.run.tune_output import format_summary
from pipeline.train import segmentation_jobs, train_folds
from pipeline.train_classifier import classifier_jobs, score_all_folds, train_classifier_folds
from pipeline.tune import tune

log = logging.getLogger(__name__)


def run_demo(config: Config, submissions_dir: Path = Path("submissions")) -> dict[str, Any]:
    """Generate the demo data if needed, then run every stage; return the headline figures."""
    timings: dict[str, float] = {}

    def timed(name: str, stage: Callable[[], Any]) -> Any:
        started = time.monotonic()
        result = stage()
        timings[name] = round(time.monotonic() - started, 1)
        log.info("demo stage %s took %.0f s", name, timings[name])
        return result

    if config.data.submission_size is None:
        raise ValueError(
            "the demo makes its test truth at data.submission_size, so it must be [H, W]; got null"
        )
    height, width = config.data.submission_size
    out = Path(config.data.train_csv).parent
    code = timed(
        "data",
        lambda: make_demo_data.main(["--out", str(out), "--truth-size", f"{height}x{width}"]),
    )
    if code != 0:
        raise ValueError(f"demo data in {out} could not be made (see the error above)")
    folds = list(range(config.folds.n_splits))
    if use_fold_jobs(config, 2 * len(folds)):
        # Both stages' folds in one pool, so no worker idles between the stages.
        jobs = segmentation_jobs(config, folds) + classifier_jobs(config, folds)
        sizes = [config.data.image_size, config.classifier.image_size]
        timed("folds", lambda: run_parallel(config, jobs, sizes, resume=True, force=False))
    seg = timed("segmentation", lambda: train_folds(config, folds, resume=True))
    cls = timed("classifier", lambda: train_classifier_folds(config, folds, resume=True))
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
    figures = {
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
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    started = time.monotonic()
    try:
        with sigterm_as_interrupt():
            figures = run_demo(config_from_args(args))
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    except FoldJobFailed as exc:
        log.error("%s\nfix the cause and run make demo again: finished stages are kept", exc)
        return 1
    except KeyboardInterrupt:
        return report_interrupt("make demo (which resumes)")
    print(f"segmentation OOF Kaggle Dice at threshold 0.5: {figures['oof_kaggle_dice_050']:.4f}")
    print(
        f"OOF Kaggle Dice after tuned post-processing:  nested {figures['oof_tuned_nested']:.4f}"
        f" (honest), in-sample {figures['oof_tuned']:.4f}"
    )
    for label, key in (
        ("pooled", "classifier_auc_pooled"),
        ("fold mean", "classifier_auc_fold_mean"),
    ):
        aucs = ", ".join(f"{k} {v:.3f}" for k, v in figures[key].items())
        print(f"classifier OOF AUC per class ({label}): {aucs}")
    if figures["test_score"] is not None:
        print(f"test Kaggle Dice of the submission:           {figures['test_score']:.4f}")
    print(f"submission: {figures['submission']}")
    print(f"report: {figures['report']}")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in figures["timings_s"].items())
    print(f"time: {time.monotonic() - started:.0f} s ({stages})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
