"""Deployment benchmark: a kernel-style script, ``pipeline.predict`` and the exported bundle
on every engine, on the same images and folds, as whole processes.

Usage: ``python benchmarks/bench_deploy.py [--quick] [--n-test N] [--workdir DIR]
[--no-record]``

Generates demo test images (700x1050 JPEGs, truth at 350x525) and a fake experiment of
3 segmentation folds of the freshly initialised U-Net / EfficientNet-B2 at 352x480
(``encoder_weights: null``; random weights cost the same time as trained ones), 4 flip
views, post-processing threshold 0.5 and no minimum area (the kernel's rule). Then, each
as its own process, timed from start to exit (imports, model loading and every file
included):

- ``kernel``: ``benchmarks/kernel_predict.py`` (TensorFlow, batch 1 per fold and view);
- ``predict_tensorflow`` / ``predict_openvino``: ``python -m pipeline.predict`` with
  ``predict.engine`` set (OpenVINO's one-time conversion of the folds is timed in a first
  run, ``predict_openvino_cold``, and cached for the timed one);
- ``bundle_openvino`` / ``bundle_onnxruntime`` / ``bundle_tensorflow``: ``python -m
  pipeline.run_bundle`` on the bundle ``python -m pipeline.export`` wrote in every format
  (export timed apart).

Per run: wall seconds, forward seconds per image (the time inside the network calls,
divided by the images), the test Kaggle Dice against the truth (random weights: only
equality between the runs means something) and the Kaggle Dice of its submission
against ``predict_tensorflow``'s. Precision is ``predict.precision: auto`` everywhere
(bfloat16 on a CPU that computes it natively, else float32); the kernel runs float32.
The last line printed is one JSON object, also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import describe_machine, record
from pipeline.core.config import load_config
from pipeline.core.postprocess import PostprocessParams, save_postprocess
from pipeline.core.precision import choose_precision, cpu_flags
from pipeline.core.submission import score_submission
from pipeline.core.submission_check import read_submission
from pipeline.make_demo_data import make_demo_data

REPO = Path(__file__).resolve().parents[1]
FOLDS = 3
VIEWS = ["identity", "hflip", "vflip", "hvflip"]
CLASSES = ["Fish", "Flower", "Gravel", "Sugar"]
IMAGE_SIZE = (352, 480)
SUBMISSION_SIZE = (350, 525)
FAKE_RUN = """
import sys
from pipeline.core.config import load_config
from pipeline.nn.engines import build_prediction_model
from pipeline.nn.weights import save_weights_atomic
config = load_config(sys.argv[1])
model = build_prediction_model(config, 4)
for fold in range({folds}):
    save_weights_atomic(model, config.fold_dir(fold) / "best_weights.h5")
"""


def write_config(work: Path, data: Path, quick: bool) -> Path:
    size = [64, 96] if quick else list(IMAGE_SIZE)
    overrides = {
        "experiment": "bench_deploy",
        "runs_dir": str(work / "runs"),
        "data": {
            "train_csv": str(data / "train.csv"),
            "train_images": str(data / "train_images"),
            "test_images": str(data / "test_images"),
            "sample_submission": str(data / "sample_submission.csv"),
            "test_truth": str(data / "test_truth.csv"),
            "image_size": size,
            "submission_size": list(SUBMISSION_SIZE),
        },
        "folds": {"n_splits": FOLDS},
        "model": {"encoder_weights": None, **({"backbone": "efficientnetb0"} if quick else {})},
        "tta": {"views": VIEWS, "batch_size": 4},
    }
    path = work / "bench_deploy.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return path


def write_fake_run(config_path: Path, data: Path) -> None:
    config = load_config(config_path)
    if config.run_dir.exists():
        shutil.rmtree(config.run_dir)
    done = subprocess.run(
        [sys.executable, "-c", FAKE_RUN.format(folds=FOLDS), str(config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    for fold in range(FOLDS):
        (config.fold_dir(fold) / "metrics.json").write_text(json.dumps({"fold": fold}))
    ids = sorted(p.name for p in (data / "train_images").iterdir())
    pd.DataFrame({"image_id": ids, "fold": [i % FOLDS for i in range(len(ids))]}).to_csv(
        config.run_dir / "folds.csv", index=False
    )
    params = {name: PostprocessParams(threshold=0.5, min_area=0) for name in CLASSES}
    extra = {"scores": {"tuned": 0.0}, "size": list(SUBMISSION_SIZE)}
    save_postprocess(config.run_dir / "postprocess.json", params, extra)


def timed(name: str, command: list[str]) -> tuple[float, str]:
    """Run ``command`` from the repository; (wall seconds, stdout and stderr)."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    print(f"{name}: {seconds:.1f}s", flush=True)
    return seconds, done.stdout + done.stderr


def kaggle_dice(
    a: pd.DataFrame,
    b: pd.DataFrame,
    size: tuple[int, int] = SUBMISSION_SIZE,
    fmt: str = "image_label",
    classes: list[str] = CLASSES,
) -> float:
    """Kaggle Dice of submission ``a`` scored against submission ``b`` as its truth."""
    return float(score_submission(a, b, fmt, classes, size, "submission", "reference")["overall"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny images and B0: a smoke run")
    parser.add_argument("--n-test", type=int, help="test images (default 16, --quick 2)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_deploy"))
    parser.add_argument("--no-record", action="store_true", help="do not append to results")
    args = parser.parse_args(argv)
    n_test = args.n_test or (2 if args.quick else 16)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"data_{n_test}"
    make_demo_data(data, 6, n_test, 700, 1050, SUBMISSION_SIZE, seed=2026, force=False, workers=2)
    config = write_config(work, data, args.quick)
    write_fake_run(config, data)
    bundle = work / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    python = sys.executable
    export_s, _ = timed("export", [python, "-m", "pipeline.export", "--config", str(config),
                                   "--out", str(bundle), "--formats",
                                   "savedmodel,openvino,onnx"])  # fmt: skip
    outputs = {name: work / f"{name}.csv" for name in (
        "kernel", "predict_tensorflow", "predict_openvino", "bundle_openvino",
        "bundle_onnxruntime", "bundle_tensorflow"
    )}  # fmt: skip
    for path in outputs.values():
        path.unlink(missing_ok=True)
    subs = ["--submissions-dir", str(work / "submissions")]
    predict = [python, "-m", "pipeline.predict", "--config", str(config), *subs]
    bundle_run = [python, "-m", "pipeline.run_bundle", "--bundle", str(bundle), "--images",
                  str(data / "test_images"), "--sample-submission",
                  str(data / "sample_submission.csv")]  # fmt: skip
    commands = {
        "kernel": [python, "benchmarks/kernel_predict.py", str(config), str(outputs["kernel"])],
        "predict_tensorflow": [*predict, "--out", str(outputs["predict_tensorflow"]),
                               "--set", "predict.engine=tensorflow"],
        "predict_openvino": [*predict, "--out", str(outputs["predict_openvino"]),
                             "--set", "predict.engine=openvino"],
        "bundle_openvino": [*bundle_run, "--engine", "openvino",
                            "--out", str(outputs["bundle_openvino"])],
        "bundle_onnxruntime": [*bundle_run, "--engine", "onnxruntime",
                               "--out", str(outputs["bundle_onnxruntime"])],
        "bundle_tensorflow": [*bundle_run, "--engine", "tensorflow",
                              "--out", str(outputs["bundle_tensorflow"])],
    }  # fmt: skip
    cold = work / "cold.csv"
    cold.unlink(missing_ok=True)
    # The first OpenVINO prediction converts the folds (cached for the timed run).
    shutil.rmtree(load_config(config).run_dir / "openvino", ignore_errors=True)
    cold_s, _ = timed("predict_openvino_cold", [*predict, "--out", str(cold),
                      "--set", "predict.engine=openvino"])  # fmt: skip
    runs: dict[str, dict[str, Any]] = {}
    truth = read_submission(data / "test_truth.csv")
    for name, command in commands.items():
        seconds, text = timed(name, command)
        if name == "kernel":
            forward = float(re.findall(r"forward_s ([\d.]+)", text)[-1])
        elif name.startswith("predict"):
            run_dir = load_config(config).run_dir
            forward = json.loads((run_dir / "predict.json").read_text())["stage_seconds"]["network"]
        else:
            forward = float(re.findall(r"network ([\d.]+)s", text)[-1])
        frame = read_submission(outputs[name])
        scored = score_submission(
            frame, truth, "image_label", CLASSES, SUBMISSION_SIZE, name, "truth"
        )
        runs[name] = {
            "seconds": round(seconds, 2),
            "forward_s_per_image": round(forward / n_test, 4),
            "test_kaggle_dice": round(float(scored["overall"]), 4),
        }
    reference = read_submission(outputs["predict_tensorflow"])
    for name in runs:
        runs[name]["dice_vs_predict_tensorflow"] = round(
            kaggle_dice(read_submission(outputs[name]), reference), 4
        )
        speedup = runs["kernel"]["seconds"] / runs[name]["seconds"]
        runs[name]["speedup_vs_kernel"] = round(speedup, 2)
    fastest = min(runs, key=lambda name: runs[name]["seconds"])
    figures: dict[str, Any] = {
        "benchmark": "deploy",
        "machine": describe_machine(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "quick": args.quick,
        "n_images": n_test,
        "folds": FOLDS,
        "views": len(VIEWS),
        "image_size": [64, 96] if args.quick else list(IMAGE_SIZE),
        "backbone": "efficientnetb0" if args.quick else "efficientnetb2",
        "precision": choose_precision("auto", cpu_flags()),
        "export_seconds": round(export_s, 2),
        "predict_openvino_cold_seconds": round(cold_s, 2),
        "runs": runs,
        "fastest": fastest,
        "fastest_speedup_vs_kernel": runs[fastest]["speedup_vs_kernel"],
    }
    print()
    print(f"{'run':<20} {'seconds':>8} {'fwd s/img':>10} {'x kernel':>9} {'Dice vs TF':>11}")
    for name, row in runs.items():
        print(
            f"{name:<20} {row['seconds']:>8.1f} {row['forward_s_per_image']:>10.3f} "
            f"{row['speedup_vs_kernel']:>9.2f} {row['dice_vs_predict_tensorflow']:>11.4f}"
        )
    record(figures, keep=not (args.no_record or args.quick))
    return figures


if __name__ == "__main__":
    main()
