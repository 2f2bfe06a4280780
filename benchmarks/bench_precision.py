"""Inference precision benchmark: a trained experiment's OOF and test predictions in
float32 and in a 16-bit precision, scored the same way.

Usage: ``python benchmarks/bench_precision.py --config C [--precision bfloat16]
[--set KEY=VALUE ...] [--no-record]``

For every fold of a trained experiment, the fold's best weights go into a float32 model
and into one built under ``--precision`` (``predict.precision``'s policies: float32
weights, float32 probabilities); both predict the fold's validation images (OOF) and,
when ``data.test_truth`` is set, the test images, with the experiment's TTA views. It
prints the OOF Kaggle Dice at 0.5 (and the test's, folds averaged) of both, their
difference, the largest probability difference, the images per second of both, the
precision ``auto`` would pick here and the CPU features found. The last line is one JSON
object, also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import compute_figures, describe_machine, record  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.precision import BF16_CPU_FLAGS, cpu_flags  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--precision", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)

    from pipeline.core.mask_csv import read_masks
    from pipeline.core.masks import resize_probs, truth_masks
    from pipeline.core.metrics import kaggle_dice
    from pipeline.nn.devices import inference_precision, precision_policy
    from pipeline.nn.engines import build_prediction_model
    from pipeline.nn.inference import iter_batches, predict_tta
    from pipeline.nn.weights import load_best_weights
    from pipeline.run.experiment import open_experiment
    from pipeline.run.image_cache import build_cache, training_cache
    from pipeline.run.trained_run import fold_weights

    config = load_config(args.config, args.set)
    exp = open_experiment(config)
    rles = exp.rles()
    cache = training_cache(config, exp, config.data.image_size)
    n_classes = len(exp.classes)
    models = {"float32": build_prediction_model(config, n_classes)}
    with precision_policy(args.precision):
        models[args.precision] = build_prediction_model(config, n_classes)
    target = config.data.submission_size
    test = None
    if config.data.test_truth:
        truth = read_masks(config.data.test_truth, exp.csv_format, exp.classes)
        wide = truth.table.pivot(index="image_id", columns="class_name", values="rle")
        test_rles = {str(i): [str(r) for r in row] for i, row in wide[exp.classes].iterrows()}
        test_ids = sorted(test_rles)
        test = build_cache(
            exp.cache_dir, "test", Path(config.data.test_images), test_ids, config.data.image_size
        )

    def predict(model: Any, images: np.ndarray) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        out = [
            predict_tta(model, np.asarray(images[b[0] : b[-1] + 1]), config.tta.views)
            for b in iter_batches(len(images), config.tta.batch_size)
        ]
        return np.concatenate(out), len(images) / (time.perf_counter() - started)

    oof: dict[str, list[np.ndarray]] = {name: [] for name in models}
    rates: dict[str, list[float]] = {name: [] for name in models}
    largest = 0.0
    test_probs: dict[str, np.ndarray] = {}
    for fold, weights in enumerate(fold_weights(config, "")):
        _, val_ids = exp.members(fold)
        rows = cache.index_of(val_ids)
        images = np.asarray(cache.images[np.sort(rows)])
        order = [cache.image_ids[i] for i in np.sort(rows)]
        probs = {}
        for name, model in models.items():
            load_best_weights(model, weights)
            probs[name], rate = predict(model, images)
            rates[name].append(rate)
            if test is not None:
                tp, _ = predict(model, np.asarray(test.images))
                test_probs[name] = test_probs.get(name, 0) + tp / config.folds.n_splits
        largest = max(largest, float(np.abs(probs["float32"] - probs[args.precision]).max()))
        sizes = dict(zip(cache.image_ids, cache.original_sizes, strict=True))
        for name in models:
            for image_id, prob in zip(order, probs[name], strict=True):
                height, width = (int(v) for v in sizes[image_id])
                size = target or (height, width)
                t = truth_masks(rles[image_id], (height, width), size)
                oof[name].append(kaggle_dice(t[None], resize_probs(prob, size)[None], 0.5)[0])
        print(f"fold {fold}: largest probability difference so far {largest:.4f}", flush=True)
    scores = {name: float(np.mean(oof[name])) for name in models}
    views = len(config.tta.views)
    height, width = config.data.image_size
    compute = {
        name: compute_figures(
            model, height, width, name, 1.0 / (float(np.mean(rates[name])) * views)
        )
        for name, model in models.items()
    }
    result: dict[str, Any] = {
        "benchmark": "precision",
        "machine": describe_machine(),
        "cpu_bf16_flags": sorted(BF16_CPU_FLAGS & cpu_flags()),
        "auto_picks": inference_precision("auto"),
        "config": str(args.config),
        "precision": args.precision,
        "oof_kaggle_dice_050": {k: round(v, 4) for k, v in scores.items()},
        "oof_difference": round(scores[args.precision] - scores["float32"], 4),
        "largest_probability_difference": round(largest, 4),
        "oof_images_per_s": {k: round(float(np.mean(v)), 1) for k, v in rates.items()},
        "cpu_features": compute["float32"]["cpu_features"],
        "forward_gflops": {k: v["forward_gflops"] for k, v in compute.items()},
        "matmul_peak_gflops": {k: v["matmul_peak_gflops"] for k, v in compute.items()},
        "forward_share_of_peak": {k: v["forward_share_of_peak"] for k, v in compute.items()},
        "forward_gflop_per_image": compute["float32"]["forward_gflop_per_image"],
    }
    if test is not None:
        test_scores = {}
        for name, probs_all in test_probs.items():
            values = []
            for i, image_id in enumerate(test.image_ids):
                height, width = (int(v) for v in test.original_sizes[i])
                size = target or (height, width)
                per_class = test_rles[image_id]
                # Kaggle's test truth is encoded at the submission size (Clouds: 350x525).
                t = truth_masks(per_class, (size[0], size[1]), size)
                values.append(kaggle_dice(t[None], resize_probs(probs_all[i], size)[None], 0.5)[0])
            test_scores[name] = float(np.mean(values))
        result["test_kaggle_dice_050"] = {k: round(v, 4) for k, v in test_scores.items()}
        result["test_difference"] = round(test_scores[args.precision] - test_scores["float32"], 4)
    record(result, keep=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
