"""Agreement of an exported bundle with ``pipeline.predict`` on a trained run.

Usage: ``python benchmarks/deploy_agreement.py --config configs/demo.yaml
[--set KEY=VALUE ...] [--workdir DIR] [--python PATH] [--engines openvino,onnxruntime]
[--precision float32|bfloat16|auto] [--no-record]``

Exports the run's folds (``python -m pipeline.export``, every network format the
engines need), predicts the test set with ``python -m pipeline.predict`` on TensorFlow
in float32 (the reference) and with the bundle's own runner (``runner/run_bundle.py``)
on each of ``--engines`` at ``--precision`` (default float32; ``auto`` is what the
runner picks on this CPU: bfloat16 where it computes it natively); ``--python`` runs
the bundle with another interpreter (a virtual environment without TensorFlow: numpy,
opencv, pandas and the engine only). Without a
sample submission every image of ``data.test_images`` is predicted; without a fixed
``data.submission_size`` (DSB 2018) each image is scored at its own size. Prints and
records, per engine: whether the two submissions have the same rows, the Kaggle Dice
between them, and each one's test Kaggle Dice against ``data.test_truth``.
"""

from __future__ import annotations

import argparse
import json
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
from pipeline.core.images import folder_image_ids, read_image_size, resolve_image_path
from pipeline.core.precision import choose_precision, cpu_flags
from pipeline.core.submission import score_submission
from pipeline.core.submission_check import read_submission
from pipeline.run.runtime_engines import exported_precision

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
    parser.add_argument(
        "--engines", default="openvino", help="the bundle's engines, comma-separated"
    )
    parser.add_argument(
        "--bundle", type=Path, help="a bundle of these folds already exported (not re-exported)"
    )
    parser.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "bfloat16", "auto"),
        help="the bundle's precision (pipeline.predict, the reference, runs float32)",
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    sets = [part for item in args.overrides for part in ("--set", item)]
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bundle = args.bundle or work / "bundle"
    engines = [e.strip() for e in str(args.engines).split(",") if e.strip()]
    format_of = {"openvino": "openvino", "onnxruntime": "onnx", "tensorflow": "savedmodel"}
    formats = ",".join(dict.fromkeys(["savedmodel", *(format_of[e] for e in engines)]))
    export = [sys.executable, "-m", "pipeline.export", "--config", args.config]
    export_s = None
    if args.bundle is None:
        export_s, _ = timed("export", [*export, "--out", str(bundle), "--formats", formats, *sets])
    data = config.data
    assert data.test_truth, "the config names a truth for the test images"
    sample = ["--sample-submission", str(data.sample_submission)] if data.sample_submission else []
    predict_csv = work / "predict.csv"
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
    has_tf = subprocess.run([args.python, "-c", "import tensorflow"], capture_output=True)
    plan = read_manifest(bundle).plan
    truth = read_submission(data.test_truth)
    predicted = read_submission(predict_csv)
    key = predicted.columns[0]
    classes = list(plan.classes)
    size: Any
    if data.submission_size:
        size = (int(data.submission_size[0]), int(data.submission_size[1]))
    else:  # each image at its own size (DSB 2018)
        ids = folder_image_ids(data.test_images, list(predicted[key].astype(str).unique()))
        size = {i: read_image_size(resolve_image_path(data.test_images, i)) for i in ids}
    figures: dict[str, Any] = {
        "benchmark": "deploy_agreement",
        "machine": describe_machine(),
        "experiment": config.experiment,
        "bundle_python_has_tensorflow": has_tf.returncode == 0,
        "test_kaggle_dice_predict": None,
        "engines": {},
        "seconds": {
            "export": None if export_s is None else round(export_s, 1),
            "predict": None if predict_s is None else round(predict_s, 1),
        },
    }
    score_predict = float(
        score_submission(predicted, truth, plan.csv_format, classes, size, "predict", "truth")[
            "overall"
        ]
    )
    figures["test_kaggle_dice_predict"] = round(score_predict, 5)
    for engine in engines:
        module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(engine, "tensorflow")
        check = subprocess.run([args.python, "-c", f"import {module}; {probe}"], text=True,
                               capture_output=True, check=True)  # fmt: skip
        bundle_csv = work / f"bundle_{engine}.csv"
        bundle_s, _ = timed(f"bundle {engine}", [
            args.python, str(bundle / "runner" / "run_bundle.py"), "--bundle", str(bundle),
            "--images", str(data.test_images), *sample, "--out", str(bundle_csv),
            "--engine", engine, "--precision", args.precision,
        ])  # fmt: skip
        bundled = read_submission(bundle_csv)
        score = float(
            score_submission(bundled, truth, plan.csv_format, classes, size, "bundle", "truth")[
                "overall"
            ]
        )
        figures["engines"][engine] = {
            "tensorflow_modules_after_import": check.stdout.strip(),
            "same_rows": list(predicted[key]) == list(bundled[key]),
            "dice_between": round(
                kaggle_dice(bundled, predicted, size, plan.csv_format, classes), 5
            ),
            "precision": exported_precision(engine, choose_precision(args.precision, cpu_flags())),
            "test_kaggle_dice_bundle": round(score, 5),
            "score_difference": round(abs(score_predict - score), 5),
            "seconds": round(bundle_s, 1),
        }
    print(json.dumps(figures, indent=1))
    for engine in engines:
        record(engine_record(figures, engine), keep=not args.no_record)
    return figures


def engine_record(figures: dict[str, Any], engine: str) -> dict[str, Any]:
    """One engine's figures as a flat record (one row of docs/results.md)."""
    result = figures["engines"][engine]
    return {
        "benchmark": "deploy_agreement",
        "machine": figures["machine"],
        "experiment": figures["experiment"],
        "engine": engine,
        "bundle_precision": result["precision"],
        "bundle_python_has_tensorflow": figures["bundle_python_has_tensorflow"],
        "bundle_tensorflow_modules": result["tensorflow_modules_after_import"],
        "same_rows": result["same_rows"],
        "dice_between": result["dice_between"],
        "test_kaggle_dice_predict": figures["test_kaggle_dice_predict"],
        "test_kaggle_dice_bundle": result["test_kaggle_dice_bundle"],
        "score_difference": result["score_difference"],
        "seconds": {**figures["seconds"], "bundle": result["seconds"]},
        **{k: figures[k] for k in ("date", "commit", "note") if k in figures},
    }


if __name__ == "__main__":
    main()
