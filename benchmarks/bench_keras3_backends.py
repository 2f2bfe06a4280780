"""Keras 3 backends on this machine: the same U-Net / EfficientNet-B2, forward and train step.

Usage: ``KERAS_BACKEND=tensorflow|jax python benchmarks/bench_keras3_backends.py
[--size 352 480] [--batch-size 8] [--repeats 5] [--quick] [--no-record]``

Builds segmodels-keras' ``Unet("efficientnetb2")`` (``encoder_weights=None``, 4 classes,
sigmoid) on plain Keras 3 with the backend ``KERAS_BACKEND`` names, compiles it with Adam
and the Jaccard loss, and times, after a warm-up call (tracing or XLA compilation), the
median of ``--repeats`` calls of ``predict_on_batch`` (the forward) and of
``train_on_batch`` (one training step) on one in-memory batch. It prints the seconds per
image and the train-step / forward ratio; the last line is one JSON object, appended to
benchmarks/results.jsonl. This is the figure behind ``framework: keras3`` shipping on the
TensorFlow backend only (docs/frameworks.md). JAX is not a dependency of the
project: install it beside the environment (e.g. ``pip install --target DIR jax jaxlib``
without numpy/scipy) and run with ``PYTHONPATH=DIR KERAS_BACKEND=jax``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["SM_FRAMEWORK"] = "keras"
os.environ.pop("TF_USE_LEGACY_KERAS", None)

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import describe_machine, record


def per_image(fn: Callable[[], object], repeats: int, batch: int) -> float:
    fn()  # warm-up: tracing / compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, nargs=2, default=[352, 480])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="96x128, batch 2, 2 repeats")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch_size, args.repeats = [96, 128], 2, 2
    import keras
    import segmodels_keras as sm

    (height, width), batch = args.size, args.batch_size
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, height, width, 3)).astype("float32")
    y = (rng.random((batch, height, width, 4)) > 0.9).astype("float32")
    model = sm.Unet(
        "efficientnetb2",
        encoder_weights=None,
        classes=4,
        activation="sigmoid",
        input_shape=(height, width, 3),
    )
    model.compile(keras.optimizers.Adam(1e-3), loss=sm.losses.JaccardLoss())
    started = time.perf_counter()
    forward = per_image(lambda: model.predict_on_batch(x), args.repeats, batch)
    step = per_image(lambda: model.train_on_batch(x, y), args.repeats, batch)
    backend = keras.backend.backend()
    print(
        f"Keras {keras.__version__} on {backend}: forward {forward:.4f} s/image, train step "
        f"{step:.4f} s/image ({step / forward:.2f}x the forward)"
    )
    record(
        {
            "benchmark": "keras3_backends",
            "machine": describe_machine(),
            "backend": backend,
            "keras": keras.__version__,
            "size": [height, width],
            "batch_size": batch,
            "precision": "float32",
            "quick": args.quick,
            "forward_s_per_image": round(forward, 4),
            "train_step_s_per_image": round(step, 4),
            "train_step_over_forward": round(step / forward, 2),
            "total_s": round(time.perf_counter() - started, 1),
        },
        keep=not args.no_record,
    )


if __name__ == "__main__":
    main()
