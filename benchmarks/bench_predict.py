"""Prediction benchmark: ``pipeline.predict`` end to end against the bare network forward.

Usage: ``python benchmarks/bench_predict.py [--quick] [--n-test N] [--batch-size B]
[--workdir DIR] [--no-record]``

Generates Clouds-size demo test images (1400x2100 JPEGs, truth at 350x525) and a fake
experiment of 3 segmentation folds whose weights are the freshly initialised default
model (U-Net / EfficientNet-B2 at 384x576, ``encoder_weights: null``): the network
costs the same as with trained weights. Then it measures:

- end to end: ``pipeline.predict.predict(config)`` in this process (TensorFlow already
  imported), from the JPEGs (cache built cold) to the validated, scored and recorded
  submission;
- the reference: the same model's ``predict_on_batch`` on in-memory float32 tensors,
  as many calls of the same batch shapes (``tta.batch_size`` images x 4 views) as the
  prediction makes over 3 folds, after one warm-up call; half of the calls are timed
  just before the end-to-end run and half just after it, so that a change in the load
  of a shared machine favours neither side.

Efficiency = reference / end to end in wall time (target >= 0.90); the same ratio in
process CPU time is reported too, being less disturbed by other processes. The last
line printed is one JSON object, which is also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import compute_figures, describe_machine, format_compute, record
from pipeline.core.atomic import write_csv
from pipeline.core.config import load_config
from pipeline.core.images import list_image_files
from pipeline.core.layout import FOLDS as FOLDS_CSV
from pipeline.core.postprocess import PostprocessParams, save_postprocess
from pipeline.core.precision import PRECISIONS
from pipeline.make_demo_data import make_demo_data
from pipeline.nn.devices import device_name as describe_device
from pipeline.nn.devices import inference_precision, precision_policy
from pipeline.nn.model import build_model
from pipeline.nn.weights import save_weights_atomic
from pipeline.predict import predict
from pipeline.run.command import setup_logging

FOLDS = 3
VIEWS = ["identity", "hflip", "vflip", "hvflip"]
CLASSES = 4
IMAGE_SIZE = (384, 576)


def make_config(work: Path, data: Path, batch_size: int, precision: str = "auto"):
    """The default config on the generated data, 3 folds, no pretrained weights."""
    return load_config(
        None,
        [
            "experiment=bench_predict",
            f"runs_dir={work / 'runs'}",
            f"data.train_csv={data / 'train.csv'}",
            f"data.train_images={data / 'train_images'}",
            f"data.test_images={data / 'test_images'}",
            f"data.sample_submission={data / 'sample_submission.csv'}",
            f"data.test_truth={data / 'test_truth.csv'}",
            f"folds.n_splits={FOLDS}",
            "model.encoder_weights=null",
            f"tta.views=[{','.join(VIEWS)}]",
            f"tta.batch_size={batch_size}",
            f"predict.precision={precision}",
        ],
    )


def write_fake_run(config, model) -> None:
    """The split, fold weights (the same fresh model in each), finished-fold markers and
    postprocess.json: what a trained run holds that prediction reads."""
    ids = list_image_files(config.data.train_images)
    split = pd.DataFrame({"image_id": ids, "fold": [k % FOLDS for k in range(len(ids))]})
    config.run_dir.mkdir(parents=True, exist_ok=True)
    write_csv(config.run_dir / FOLDS_CSV, split)
    for fold in range(FOLDS):
        fold_dir = config.fold_dir(fold)
        fold_dir.mkdir(parents=True, exist_ok=True)
        save_weights_atomic(model, fold_dir / "best_weights.h5")
        (fold_dir / "metrics.json").write_text(json.dumps({"fold": fold}))
    # Settings of the shape the recipe tunes: a threshold and a minimum area per class.
    params = {
        name: PostprocessParams(threshold=0.5, min_area=10_000)
        for name in ("Fish", "Flower", "Gravel", "Sugar")
    }
    save_postprocess(config.run_dir / "postprocess.json", params, {"scores": {"tuned": 0.0}})


class ForwardReference:
    """The prediction's forward calls on in-memory tensors, runnable in parts.

    The calls (3 folds x the batches, each ``batch * 4 views`` images) are split into
    two halves, timed before and after the end-to-end run, so that a change in the load
    of a shared machine biases neither side.
    """

    def __init__(self, model, n_images: int, batch_size: int) -> None:
        rng = np.random.default_rng(0)
        sizes = [min(batch_size, n_images - start) for start in range(0, n_images, batch_size)]
        self.model = model
        self.inputs = {
            size: rng.uniform(0, 255, (size * len(VIEWS), *IMAGE_SIZE, 3)).astype(np.float32)
            for size in set(sizes)
        }
        self.calls = sizes * FOLDS
        for batch in self.inputs.values():
            model.predict_on_batch(batch)  # warm-up: traces the predict function per shape

    def run(self, part: int) -> tuple[float, float]:
        """(wall, process CPU) seconds of half ``part`` (0 or 1) of the calls."""
        half = len(self.calls) // 2
        calls = self.calls[:half] if part == 0 else self.calls[half:]
        wall, cpu = time.perf_counter(), time.process_time()
        for size in calls:
            self.model.predict_on_batch(self.inputs[size])
        return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 test images (6 training images), a smoke run"
    )
    parser.add_argument("--n-test", type=int, help="test images (default 24, --quick 2)")
    parser.add_argument("--batch-size", type=int, default=2, help="tta.batch_size (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_predict"))
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="predict.precision (default auto); when it resolves to a 16-bit precision, "
        "predict also runs in float32 and the speedup is printed",
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to results")
    args = parser.parse_args(argv)
    n_test = args.n_test or (2 if args.quick else 24)

    setup_logging()
    # The training images only make the split of the fake run: 2 per fold are enough.
    n_train = 6 if args.quick else 30
    data = args.workdir / f"data_{n_train}_{n_test}"  # make_demo_data refuses to change a set
    started = time.perf_counter()
    make_demo_data(
        data, n_train, n_test, 1400, 2100, (350, 525), seed=12345, force=False, workers=2
    )
    data_s = time.perf_counter() - started
    config = make_config(args.workdir, data, args.batch_size, args.precision)
    if config.run_dir.exists():
        shutil.rmtree(config.run_dir)
    model = build_model(config, CLASSES)
    write_fake_run(config, model)
    precision = inference_precision(args.precision)
    with precision_policy(precision):  # the reference computes as predict does
        reference_model = build_model(config, CLASSES)
    reference_model.set_weights(model.get_weights())

    reference = ForwardReference(reference_model, n_test, args.batch_size)
    calls = len(reference.calls)
    load_before = os.getloadavg()[0]
    first_wall, first_cpu = reference.run(0)
    cpu = time.process_time()
    result = predict(config, args.workdir / "submission.csv", args.workdir / "submissions")
    end_to_end_cpu = time.process_time() - cpu  # = result["cpu_seconds"], plus the call
    end_to_end_s = result["seconds"]
    second_wall, second_cpu = reference.run(1)
    load_after = os.getloadavg()[0]
    forward_s, forward_cpu = first_wall + second_wall, first_cpu + second_cpu
    efficiency = forward_s / end_to_end_s
    cpu_efficiency = forward_cpu / end_to_end_cpu
    stages = result["stage_seconds"]
    float32_s = None
    if precision != "float32":
        float32_config = make_config(args.workdir, data, args.batch_size, "float32")
        float32_s = predict(
            float32_config, args.workdir / "submission_float32.csv", args.workdir / "submissions"
        )["seconds"]
    passes = n_test * FOLDS * len(VIEWS)
    compute = compute_figures(model, *IMAGE_SIZE, precision, forward_s / passes)
    machine = describe_machine()
    device = describe_device()
    if device != "CPU":
        machine["gpu"] = device

    figures: dict[str, object] = {
        "benchmark": "predict",
        "machine": machine,
        "quick": args.quick,
        "n_images": n_test,
        "folds": FOLDS,
        "views": len(VIEWS),
        "image_size": list(IMAGE_SIZE),
        "batch_size": args.batch_size,
        "forward_calls": calls,
        "end_to_end_s": round(end_to_end_s, 2),
        "forward_s": round(forward_s, 2),
        "efficiency": round(efficiency, 3),
        "precision_requested": args.precision,
        **compute,
        "end_to_end_float32_s": None if float32_s is None else round(float32_s, 2),
        "speedup_vs_float32": None if float32_s is None else round(float32_s / end_to_end_s, 3),
        "end_to_end_cpu_s": round(end_to_end_cpu, 1),
        "forward_cpu_s": round(forward_cpu, 1),
        "cpu_efficiency": round(cpu_efficiency, 3),
        "overhead_s": round(end_to_end_s - forward_s, 2),
        "per_stage_s": {name: round(value, 2) for name, value in stages.items()},
        "per_stage_cpu_s": {
            name: round(value, 2) for name, value in result["stage_cpu_seconds"].items()
        },
        "per_image_s": round(end_to_end_s / n_test, 2),
        "data_generation_s": round(data_s, 1),
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    print(f"{n_test} test images of 1400x2100, {FOLDS} folds x {len(VIEWS)} views at 384x576")
    print(f"  = {passes} network passes in {calls} calls of up to {args.batch_size * 4} images")
    print(f"end to end (predict):      {end_to_end_s:8.1f} s")
    print(f"forward only (reference):  {forward_s:8.1f} s")
    print(f"efficiency:                {efficiency:8.3f}  (target >= 0.90)")
    print(f"predict.precision {args.precision}: {format_compute(compute)}")
    if float32_s is not None:
        speedup = float32_s / end_to_end_s
        print(f"float32 end to end: {float32_s:.1f} s: {precision} is {speedup:.2f}x as fast")
    print(
        f"process CPU time: end to end {end_to_end_cpu:.0f} s, forward {forward_cpu:.0f} s, "
        f"ratio {cpu_efficiency:.3f} (less sensitive to other processes)"
    )
    print(f"  {'stage':<13} {'wall s':>8} {'share':>6} {'CPU s':>8}")
    for name, value in stages.items():
        share = value / end_to_end_s if end_to_end_s else math.nan
        cpu_s = result["stage_cpu_seconds"][name]
        print(f"  {name:<13} {value:8.2f} {share:6.1%} {cpu_s:8.2f}")
    print(f"load average (1 min) before/after: {load_before:.2f} / {load_after:.2f}")
    record(figures, keep=not args.no_record)
    return figures


if __name__ == "__main__":
    main()
