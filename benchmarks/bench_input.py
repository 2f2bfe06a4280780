"""Input pipeline benchmark: does the model ever wait for data?

On demo data generated at Clouds size (1400x2100, cached at 384x576, 352x544 crops,
the reference augmentations) it measures:
- the training input pipeline alone, in images per second;
- full training steps fed by that pipeline versus the same steps fed from tensors
  already in memory (same model, batch and number of steps): the ratio is the share of
  the in-memory step rate that the real pipeline reaches (target: at least 0.95).

    python benchmarks/bench_input.py [--quick] [--backbone efficientnetb2] [--steps 8] [--no-record]

The last line printed is one JSON object, also appended to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import compute_figures, describe_machine, format_compute, record
from pipeline.core.config import load_config
from pipeline.core.lr_range import resolve_lr
from pipeline.make_demo_data import make_demo_data
from pipeline.nn.data import CropSampler, build_augmentation, make_train_dataset
from pipeline.nn.keras_backend import keras, tf
from pipeline.nn.losses import get_loss
from pipeline.nn.metrics import get_metrics
from pipeline.nn.model import build_model
from pipeline.nn.optim import make_optimizer
from pipeline.run.experiment import open_experiment
from pipeline.run.image_cache import build_cache


def time_fit(model: keras.Model, dataset: tf.data.Dataset, steps: int) -> float:
    """Seconds for ``steps`` training steps (after one warm-up step)."""
    model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small images, few steps")
    parser.add_argument("--backbone", default="efficientnetb2")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--work", default="/tmp/foldseg_bench_input")
    parser.add_argument(
        "--no-record", action="store_true", help="do not append to benchmarks/results.jsonl"
    )
    args = parser.parse_args(argv)
    work = Path(args.work)
    height, width = (280, 420) if args.quick else (1400, 2100)
    n_images = 16 if args.quick else 48
    data = work / f"data_{height}x{width}"
    started = time.perf_counter()
    make_demo_data(
        data,
        n_train=n_images,
        n_test=1,
        height=height,
        width=width,
        truth_size=(350, 525),
        seed=1,
    )
    print(f"demo data {n_images} images at {height}x{width}: {time.perf_counter() - started:.1f} s")
    image_size, crop = ([128, 192], [96, 160]) if args.quick else ([384, 576], [352, 544])
    config = load_config(
        None,
        [
            f"runs_dir={work / 'runs'}",
            "experiment=bench_input",
            f"data.train_csv={data / 'train.csv'}",
            f"data.train_images={data / 'train_images'}",
            f"data.image_size={image_size}",
            f"train.crop_size={crop}",
            f"model.backbone={args.backbone}",
            "model.encoder_weights=null",
        ],
    )
    exp = open_experiment(config)
    started = time.perf_counter()
    cache = build_cache(
        exp.cache_dir,
        "train",
        Path(config.data.train_images),
        exp.image_ids,
        config.data.image_size,
        exp.rles(),
    )
    cache_s = time.perf_counter() - started
    print(f"cache (decode + resize once, or reopen): {cache_s:.1f} s")
    t = config.train
    sampler = CropSampler(cache, t.crop_size, build_augmentation(config.augment), config.seed)
    indices = np.arange(len(cache.image_ids))
    dataset = make_train_dataset(
        sampler, indices, args.batch_size, config.seed, t.num_parallel_calls, t.prefetch
    )
    n_batches = max(8, args.steps)
    iterator = iter(dataset)
    next(iterator)
    started = time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    pipeline_s = time.perf_counter() - started
    pipeline_ips = n_batches * args.batch_size / pipeline_s
    print(f"input pipeline alone: {pipeline_ips:.1f} images/s")

    model = build_model(config, len(exp.classes))
    model.compile(
        optimizer=make_optimizer(resolve_lr(config), 1),
        loss=get_loss(t.loss),
        metrics=get_metrics(t.metric_threshold, t.metric_min_area),
    )
    images, masks = next(iter(dataset))
    in_memory = tf.data.Dataset.from_tensors((images, masks)).repeat()
    memory_s = time_fit(model, in_memory, args.steps)
    real_s = time_fit(model, dataset, args.steps)
    ratio = memory_s / real_s
    compute = compute_figures(
        model, crop[0], crop[1], "float32", None, memory_s / (args.steps * args.batch_size)
    )
    print(
        f"{args.steps} training steps of {args.batch_size} x {crop[0]}x{crop[1]}: "
        f"in memory {memory_s:.1f} s, real pipeline {real_s:.1f} s; "
        f"real pipeline reaches {ratio:.1%} of the in-memory step rate"
    )
    print(f"training: {format_compute(compute)}")
    result = {
        "benchmark": "input",
        "machine": describe_machine(),
        "quick": args.quick,
        "backbone": args.backbone,
        "source_size": [height, width],
        "image_size": image_size,
        "crop_size": crop,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "cache_s": round(cache_s, 2),
        "pipeline_images_s": round(pipeline_ips, 1),
        "train_images_s_in_memory": round(args.steps * args.batch_size / memory_s, 2),
        "train_images_s_pipeline": round(args.steps * args.batch_size / real_s, 2),
        "pipeline_vs_in_memory": round(ratio, 3),
        **compute,
        "pipeline_vs_model_speed": round(
            pipeline_ips / (args.steps * args.batch_size / memory_s), 1
        ),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "tensorflow": tf.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    record(result, keep=not args.no_record)
    return result


if __name__ == "__main__":
    main()
