"""Training-step benchmark: where one CPU (or GPU) training step spends its time.

Usage: ``python benchmarks/bench_train_step.py [--quick] [--backbone efficientnetb2]
[--size 352 480] [--batch-size 8] [--precision float32|bfloat16|float16]
[--repeats 5] [--rounds 2] [--no-record]``

On one in-memory batch (0-255 images, sparse masks; the model of ``build_model``, U-Net
/ EfficientNet-B2 by default, ``encoder_weights: null``) it times, all on one model
instance, each as its own compiled ``tf.function`` and as the median of ``--repeats``
calls after a warm-up, the best of ``--rounds`` rounds (rounds interleave the parts, so
a change in the machine's load favours none):

- ``forward``: the inference forward (``training=False``), what prediction pays;
- ``forward_train``: the forward in training mode (BatchNorm on batch statistics and
  updating its moving averages);
- ``loss`` and ``metrics``: the configured loss, and the recipe's three metrics'
  ``update_state``, each alone on the batch's masks and a fixed prediction;
- ``gradients``: forward, loss and the backward pass (``tape.gradient``);
- ``optimizer``: ``AccumAdam.apply_gradients`` alone on fixed gradients, one step;
- ``accumulate``: the same with ``accumulation_steps=8`` (the recipe's), per call over
  a whole accumulation cycle (7 additions to the accumulators, 1 applied Adam step);
- ``fit_step``: a step of ``model.fit`` (the batch repeated by ``tf.data``, so no input
  cost) compiled as ``pipeline.train`` compiles it: loss and the three metrics, one
  Adam step; ``fit_step_no_metrics``: the same compiled without metrics;
  ``fit_step_accumulating``: with ``accumulation_steps=8``, per micro-batch.

It prints the seconds per image of each, the backward (gradients minus forward and
loss), what ``fit`` adds to the parts, the train-step / forward cost ratio, the
network's FLOPs per image (``pipeline.nn.compute``), the achieved GFLOP/s of the forward
and of the train step (3 forwards' worth), the matmul peak measured in the same run in
the precision used, the precision and the CPU features found. The last line is one JSON
object, appended to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import compute_figures, describe_machine, format_compute, record
from pipeline.core.config import load_config
from pipeline.core.lr_range import resolve_lr
from pipeline.core.precision import POLICIES
from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.losses import get_loss
from pipeline.nn.metrics import get_metrics
from pipeline.nn.model import build_model
from pipeline.nn.optim import make_optimizer

PARTS = (
    "forward",
    "forward_train",
    "loss",
    "metrics",
    "gradients",
    "optimizer",
    "accumulate",
    "fit_step_no_metrics",
    "fit_step",
    "fit_step_accumulating",
)
ACCUMULATION = 8


def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``call`` after one warm-up call (which also traces it)."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _synced(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` that also waits for its result's computation."""
    return lambda: sync(call())


def sync(value: Any) -> Any:
    """Wait for ``value``'s computation (a tensor or nested structure of tensors)."""
    return [np.asarray(v) for v in tf.nest.flatten(value)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="defaults EfficientNet-B0, 96x128, batch 2 (explicit options still win)",
    )
    parser.add_argument("--backbone", help="default efficientnetb2")
    parser.add_argument("--size", type=int, nargs=2, help="default 352 480")
    parser.add_argument("--batch-size", type=int, help="default 8")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--precision", default="float32", choices=sorted(POLICIES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    defaults = ("efficientnetb0", [96, 128], 2) if args.quick else ("efficientnetb2", [352, 480], 8)
    args.backbone = args.backbone or defaults[0]
    args.size = args.size or defaults[1]
    args.batch_size = args.batch_size or defaults[2]
    height, width = args.size
    batch = args.batch_size
    config = load_config(None, [f"model.backbone={args.backbone}", "model.encoder_weights=null"])
    t = config.train
    keras.mixed_precision.set_global_policy(POLICIES[args.precision])
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (batch, height, width, 3)).astype(np.float32))
    masks = np.zeros((batch, height, width, args.classes), np.float32)
    masks[:, height // 4 : height // 2, width // 4 : width // 2, ::2] = 1.0
    masks = tf.constant(masks)
    predictions = tf.constant(rng.random(masks.shape).astype(np.float32))
    loss_fn = get_loss(t.loss)

    model = build_model(config, args.classes)
    metrics = get_metrics(t.metric_threshold, t.metric_min_area)
    gradients_now = [tf.zeros_like(v) + 1e-3 for v in model.trainable_variables]
    lr = resolve_lr(config)
    single, accumulating = make_optimizer(lr, 1), make_optimizer(lr, ACCUMULATION)

    @tf.function
    def forward() -> tf.Tensor:
        return model(images, training=False)

    @tf.function
    def forward_train() -> tf.Tensor:
        return model(images, training=True)

    @tf.function
    def loss() -> tf.Tensor:
        return loss_fn(masks, predictions)

    @tf.function
    def update_metrics() -> list[tf.Tensor]:
        for metric in metrics:
            metric.update_state(masks, predictions)
        return [metric.result() for metric in metrics]

    @tf.function
    def gradients() -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            value = loss_fn(masks, model(images, training=True))
        return tape.gradient(value, model.trainable_variables)

    def apply(optimizer: Any) -> Callable[[], Any]:
        @tf.function
        def step() -> tf.Tensor:
            optimizer.apply_gradients(zip(gradients_now, model.trainable_variables, strict=True))
            return optimizer.iterations

        return step

    data = tf.data.Dataset.from_tensors((images, masks)).repeat()

    def fit(with_metrics: bool, steps: int) -> Callable[[], Any]:
        """Compile ``model`` as the variant asks, take one (traced, untimed) step, then
        return the call that runs ``steps`` more."""
        model.compile(
            optimizer=make_optimizer(lr, steps if steps == ACCUMULATION else 1),
            loss=get_loss(t.loss),
            metrics=get_metrics(t.metric_threshold, t.metric_min_area) if with_metrics else None,
        )
        model.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
        return lambda: model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)

    apply_accumulating = apply(accumulating)
    calls: dict[str, tuple[Callable[[], Any], int]] = {
        "forward": (forward, 1),
        "forward_train": (forward_train, 1),
        "loss": (loss, 1),
        "metrics": (update_metrics, 1),
        "gradients": (gradients, 1),
        "optimizer": (apply(single), 1),
        "accumulate": (lambda: [apply_accumulating() for _ in range(ACCUMULATION)], ACCUMULATION),
    }
    # Each fit variant is compiled afresh every round; only its steps are timed.
    fits = {
        "fit_step_no_metrics": (False, args.repeats),
        "fit_step": (True, args.repeats),
        "fit_step_accumulating": (True, ACCUMULATION),
    }
    seconds: dict[str, float] = {}
    for round_ in range(args.rounds):
        for name in PARTS:
            if name in fits:
                with_metrics, steps = fits[name]
                value = _timed(fit(with_metrics, steps)) / steps
            else:
                call, per_call = calls[name]
                value = median_seconds(_synced(call), args.repeats) / per_call
            seconds[name] = min(seconds.get(name, value), value)
            print(f"round {round_ + 1} {name:>22}: {value / batch:.4f} s/image", flush=True)
    per_image = {k: v / batch for k, v in seconds.items()}
    parts = {
        "forward": per_image["forward"],
        "training_mode": per_image["forward_train"] - per_image["forward"],
        "loss": per_image["loss"],
        "backward": per_image["gradients"] - per_image["forward_train"] - per_image["loss"],
        "optimizer": per_image["optimizer"],
        "metrics": per_image["metrics"],
        "fit_overhead": per_image["fit_step"]
        - per_image["gradients"]
        - per_image["optimizer"]
        - per_image["metrics"],
    }
    ratio = per_image["fit_step"] / per_image["forward"]
    figures = compute_figures(
        model, height, width, args.precision, per_image["forward"], per_image["fit_step"]
    )
    print(f"one fit step, {per_image['fit_step']:.4f} s/image, by part:")
    for name, value in parts.items():
        print(f"{name:>14}: {value:+.4f} s/image ({value / per_image['fit_step']:+.1%})")
    print(f"train step / forward: {ratio:.2f}x; {format_compute(figures)}")
    result = {
        "benchmark": "train_step",
        "machine": describe_machine(),
        "quick": args.quick,
        "backbone": args.backbone,
        "size": [height, width],
        "batch_size": batch,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "loss": t.loss,
        "seconds_per_image": {k: round(per_image[k], 4) for k in PARTS},
        "part_seconds_per_image": {k: round(v, 4) for k, v in parts.items()},
        "accumulating_over_single_step": round(
            per_image["fit_step_accumulating"] / per_image["fit_step"], 3
        ),
        "train_step_over_forward": round(ratio, 2),
        **figures,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "tensorflow": tf.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    record(result, keep=not args.no_record)
    return result


if __name__ == "__main__":
    main()
