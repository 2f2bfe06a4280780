"""TTA view benchmark: what each view adds to a trained experiment's OOF score.

Usage: ``python benchmarks/bench_tta_views.py --config C [--views V1,V2,...]
[--set KEY=VALUE ...] [--no-record]``

For every fold of a trained experiment, the fold's best weights predict the fold's
validation images once under each view (``--views``, default the eight geometric ones).
On non-square images the quarter turns and the transpose run at the swapped shape
(W, H), as ``predict`` now does. Each view's inverted probabilities are kept, so every
combination is scored from the same predictions: each view alone, the flips
(identity, hflip, vflip, hvflip), the flips with rot90 and rot270, all views, and the
experiment's own ``tta.views``. Scores are the OOF Kaggle Dice at threshold 0.5 at the
submission size, no post-processing, over all folds; the seconds per image of each
view's forward are printed beside them. The last line is one JSON object, also appended
to ``benchmarks/results.jsonl``.
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

from benchmarks.common import describe_machine, record  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.tta import VIEWS  # noqa: E402

FLIPS = ("identity", "hflip", "vflip", "hvflip")


def combinations(views: list[str], configured: list[str]) -> dict[str, list[str]]:
    """The named view sets scored: each view alone, then the larger sets it can form."""
    combos = {view: [view] for view in views}
    flips = [v for v in FLIPS if v in views]
    if len(flips) == len(FLIPS):
        combos["flips"] = flips
        if {"rot90", "rot270"} <= set(views):
            combos["flips+rot90+rot270"] = [*flips, "rot90", "rot270"]
    combos["all"] = list(views)
    if set(configured) <= set(views):
        combos["config"] = list(configured)
    return combos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--views", default=",".join(VIEWS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)

    from pipeline.core.masks import resize_probs, truth_masks
    from pipeline.core.metrics import kaggle_dice
    from pipeline.core.tta import merge_arrays
    from pipeline.nn.engines import build_prediction_model
    from pipeline.nn.inference import iter_batches, predict_tta
    from pipeline.nn.weights import load_best_weights
    from pipeline.run.experiment import open_experiment
    from pipeline.run.image_cache import training_cache
    from pipeline.run.trained_run import fold_weights

    config = load_config(args.config, args.set)
    views = [v for v in args.views.split(",") if v]
    exp = open_experiment(config)
    rles = exp.rles()
    cache = training_cache(config, exp, config.data.image_size)
    model = build_prediction_model(config, len(exp.classes))
    combos = combinations(views, list(config.tta.views))
    target = config.data.submission_size
    sizes = dict(zip(cache.image_ids, cache.original_sizes, strict=True))
    scores: dict[str, list[np.ndarray]] = {name: [] for name in combos}
    seconds: dict[str, float] = dict.fromkeys(views, 0.0)
    n_images = 0
    for fold, weights in enumerate(fold_weights(config, "")):
        load_best_weights(model, weights)
        _, val_ids = exp.members(fold)
        rows = np.sort(cache.index_of(val_ids))
        for batch in iter_batches(len(rows), config.tta.batch_size):
            images = np.asarray(cache.images[rows[batch]])
            per_view = {}
            for view in views:
                started = time.perf_counter()
                per_view[view] = predict_tta(model, images, [view])
                seconds[view] += time.perf_counter() - started
            for i, row in enumerate(rows[batch]):
                image_id = cache.image_ids[row]
                height, width = (int(v) for v in sizes[image_id])
                size = target or (height, width)
                truth = truth_masks(rles[image_id], (height, width), size)[None]
                for name, members in combos.items():
                    prob = merge_arrays([per_view[v][i] for v in members], config.tta.merge)
                    scores[name].append(kaggle_dice(truth, resize_probs(prob, size)[None], 0.5)[0])
            n_images += len(images)
        print(f"fold {fold}: {n_images} images so far", flush=True)
    shape = cache.images.shape[1:3]
    table = {name: round(float(np.mean(values)), 4) for name, values in scores.items()}
    per_class = {
        name: {c: round(float(np.mean(values, axis=0)[k]), 4) for k, c in enumerate(exp.classes)}
        for name, values in scores.items()
    }
    print(f"OOF Kaggle Dice at 0.5 ({n_images} images of {shape[0]}x{shape[1]}):")
    for name, value in table.items():
        extra = f"  {seconds[name] / n_images:.4f} s/image" if name in seconds else ""
        print(f"  {name:<20} {value:.4f}{extra}")
    result: dict[str, Any] = {
        "benchmark": "tta_views",
        "machine": describe_machine(),
        "config": str(args.config),
        "overrides": args.set,
        "image_size": list(map(int, shape)),
        "images": n_images,
        "merge": config.tta.merge,
        "oof_kaggle_dice_050": table,
        "per_class": per_class,
        "seconds_per_image": {v: round(s / n_images, 4) for v, s in seconds.items()},
    }
    record(result, keep=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
