"""Agreement of an exported bundle with ``pipeline.predict`` on a trained run.

Usage: ``python benchmarks/deploy_agreement.py --config configs/demo.yaml
[--set KEY=VALUE ...] [--workdir DIR] [--python PATH] [--no-record]``

Exports the run's folds (``python -m pipeline.export``), predicts the test set with
``python -m pipeline.predict`` on TensorFlow and with the bundle's own runner
(``runner/run_bundle.py``) on OpenVINO, both in float32 and, where the CPU computes it
natively, in ``predict.precision: auto``; ``--python`` runs the bundle with another
interpreter (a virtual environment without TensorFlow: numpy, opencv, pandas and
openvino only). Prints and records: whether the two submissions have the same rows,
the Kaggle Dice between them, and each one's test Kaggle Dice against
``data.test_truth``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_deploy import kaggle_dice, timed
from benchmarks.common import describe_machine, record
from pipeline.core.bundle import read_manifest
from pipeline.core.config import load_config
from pipeline.core.submission import score_submission
from pipeline.core.submission_check import read_submission

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/deploy_agreement"))
    parser.add_argument("--python", default=sys.executable, help="the bundle's interpreter")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="as the run was trained"
    )
    parser.add_argument(
        "--predicted",
        type=Path,
        help="pipeline.predict's submission (TensorFlow, float32) "
        "of these folds, instead of predicting again",
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    sets = [part for item in args.overrides for part in ("--set", item)]
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bundle = work / "bundle"
    export = [sys.executable, "-m", "pipeline.export", "--config", args.config]
    export_s, _ = timed("export", [*export, "--out", str(bundle), *sets])
    data = config.data
    assert data.sample_submission and data.test_truth, "the config names a sample and a truth"
    predict_csv, bundle_csv = work / "predict.csv", work / "bundle.csv"
    predict_s = None
    if args.predicted is not None:  # pipeline.predict's submission of the same folds
        shutil.copyfile(args.predicted, predict_csv)
    else:
        predict_s, _ = timed("predict", [
            sys.executable, "-m", "pipeline.predict", "--config", args.config,
            "--out", str(predict_csv), "--submissions-dir", str(work / "submissions"),
            *sets, "--set", "predict.engine=tensorflow", "--set", "predict.precision=float32",
        ])  # fmt: skip
    probe = "import sys; print(sorted(m for m in sys.modules if m.startswith('tensorflow')))"
    check = subprocess.run([args.python, "-c", f"import openvino; {probe}"], text=True,
                           capture_output=True, check=True)  # fmt: skip
    has_tf = subprocess.run([args.python, "-c", "import tensorflow"], capture_output=True)
    bundle_s, _ = timed("bundle", [
        args.python, str(bundle / "runner" / "run_bundle.py"), "--bundle", str(bundle),
        "--images", str(data.test_images), "--sample-submission", str(data.sample_submission),
        "--out", str(bundle_csv), "--engine", "openvino", "--precision", "float32",
    ])  # fmt: skip
    truth = read_submission(data.test_truth)
    plan = read_manifest(bundle).plan
    predicted, bundled = read_submission(predict_csv), read_submission(bundle_csv)
    assert data.submission_size, "agreement is measured at a fixed submission size"
    size = (int(data.submission_size[0]), int(data.submission_size[1]))
    key = predicted.columns[0]
    classes = list(plan.classes)
    scores = {
        name: float(
            score_submission(frame, truth, plan.csv_format, classes, size, name, "truth")["overall"]
        )
        for name, frame in (("predict", predicted), ("bundle", bundled))
    }
    figures: dict[str, Any] = {
        "benchmark": "deploy_agreement",
        "machine": describe_machine(),
        "experiment": config.experiment,
        "bundle_python_has_tensorflow": has_tf.returncode == 0,
        "bundle_tensorflow_modules": check.stdout.strip(),
        "same_rows": list(predicted[key]) == list(bundled[key]),
        "dice_between": round(kaggle_dice(bundled, predicted, size, plan.csv_format, classes), 5),
        "test_kaggle_dice_predict": round(scores["predict"], 5),
        "test_kaggle_dice_bundle": round(scores["bundle"], 5),
        "score_difference": round(abs(scores["predict"] - scores["bundle"]), 5),
        "seconds": {
            "export": round(export_s, 1),
            "predict": None if predict_s is None else round(predict_s, 1),
            "bundle": round(bundle_s, 1),
        },
    }
    record(figures, keep=not args.no_record)
    return figures


if __name__ == "__main__":
    main()
