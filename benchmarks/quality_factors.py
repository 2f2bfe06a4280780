"""The factors between the pipeline's network and a minimal Keras script, one at a time.

Usage: ``python benchmarks/quality_factors.py --config RUN_CONFIG [--fold 0] [--no-record]``

``RUN_CONFIG`` is the config of a run whose fold ``--fold`` is trained (e.g. one that
``benchmarks/bench_quality.py`` made: ``/tmp/foldseg_bench_quality/<set>/config.yaml``
with ``--set experiment=...``, or any user run). Each factor is measured directly, with
the same weights on both sides, instead of through a noisy training run:

1. optimizer: ``AccumAdam`` with one accumulation step vs ``keras.optimizers.Adam`` from
   the same weights on the same batches: the largest weight difference after 3 steps;
2. BatchNorm: the OOF forward (``predict_on_batch``) vs ``model(x, training=False)`` and
   vs training-mode statistics; the BatchNorm layers and their momentum;
3. preprocessing: the in-model ``ChannelAffine`` vs ``sm.get_preprocessing`` on the host;
4. resize: the pipeline's cache (``INTER_AREA``) vs ``cv2.resize``'s default (bilinear):
   mean absolute pixel difference, and the fold's OOF Dice on either input;
5. sampler: training samples per epoch of each (``drop_remainder`` vs a short batch);
6. OOF path: TTA views (identity vs the configured views), the uint8 store (codes and
   Dice against float probabilities), the threshold rule (pixels exactly on 0.5);
7. inference precision: the OOF Dice of the same weights at float32 and bfloat16 (what
   ``predict.precision: auto`` picks on a CPU with AVX512-BF16);
8. checkpoint: the OOF Dice per class of the best epoch's weights (kept) and of the last
   epoch's (the fold's resume checkpoint);
9. BatchNorm recalibration (``train.bn_recalibration``): the OOF Dice of every trained
   fold with the moving statistics it ended with and with statistics re-estimated on
   its training images (``nn.batchnorm``), the same weights otherwise.
The last line is one JSON object, also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import describe_machine, record  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.images import read_image, resolve_image_path  # noqa: E402
from pipeline.core.layout import BEST_WEIGHTS  # noqa: E402
from pipeline.core.masks import resize_probs, truth_masks  # noqa: E402
from pipeline.core.metrics import kaggle_dice  # noqa: E402
from pipeline.core.probstore import dequantise_prob, quantise_prob  # noqa: E402
from pipeline.nn.batchnorm import recalibrate  # noqa: E402
from pipeline.nn.checkpoint import load_state  # noqa: E402
from pipeline.nn.devices import inference_precision, precision_policy  # noqa: E402
from pipeline.nn.inference import predict_tta  # noqa: E402
from pipeline.nn.keras_backend import keras, sm, tf  # noqa: E402
from pipeline.nn.losses import get_loss  # noqa: E402
from pipeline.nn.model import build_model  # noqa: E402
from pipeline.nn.optim import make_optimizer  # noqa: E402
from pipeline.nn.weights import load_best_weights  # noqa: E402
from pipeline.run.experiment import open_experiment  # noqa: E402
from pipeline.run.image_cache import training_cache  # noqa: E402


def optimizer_factor(config: Any, n_classes: int, size: tuple[int, int]) -> dict[str, Any]:
    """Largest |weight difference| after 3 steps: AccumAdam(1) vs keras Adam."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, *size, 3)).astype(np.float32)
    y = (rng.random((4, *size, n_classes)) > 0.7).astype(np.float32)
    tf.random.set_seed(1)
    reference = build_model(config, n_classes)
    start = reference.get_weights()
    weights = []
    for optimizer in (make_optimizer(1e-3, 1), keras.optimizers.Adam(1e-3)):
        model = build_model(config, n_classes)
        model.set_weights(start)
        model.compile(optimizer=optimizer, loss=get_loss("jaccard"))
        for _ in range(3):
            model.train_on_batch(x, y)
        weights.append(model.get_weights())
    diff = max(float(np.abs(a - b).max()) for a, b in zip(*weights, strict=True))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(weights[0], start, strict=True))
    return {"max_weight_difference": diff, "largest_update": moved}


def batchnorm_factor(model: keras.Model, images: np.ndarray) -> dict[str, Any]:
    """The OOF forward uses the moving statistics; how far training-mode ones would be.

    A training-mode call updates the moving statistics: reload the weights after it.
    """
    x = images.astype(np.float32)
    oof = np.asarray(model.predict_on_batch(x))
    inference = np.asarray(model(x, training=False))
    training = np.asarray(model(x, training=True))
    layers = [m for m in model.submodules if isinstance(m, keras.layers.BatchNormalization)]
    return {
        "predict_vs_inference_mode": float(np.abs(oof - inference).max()),
        "predict_vs_training_mode": float(np.abs(oof - training).max()),
        "batchnorm_layers": len(layers),
        "momenta": sorted({round(float(m.momentum), 4) for m in layers}),
    }


def preprocessing_factor(config: Any, model: keras.Model, images: np.ndarray) -> dict[str, Any]:
    """The in-model normalisation vs segmentation-models' host preprocessing."""
    net = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    host = sm.get_preprocessing(config.model.backbone)(images.astype(np.float32).copy())
    outside = tf.sigmoid(net.predict_on_batch(np.asarray(host, dtype=np.float32))).numpy()
    inside = np.asarray(model.predict_on_batch(images.astype(np.float32)))
    return {"max_prob_difference": float(np.abs(outside - inside).max())}


def oof_dice(
    model: keras.Model, images: np.ndarray, ids: list[str], exp: Any, config: Any, sizes: Any
) -> tuple[float, np.ndarray, list[np.ndarray]]:
    """Kaggle Dice at 0.5 of ``images`` with the configured views; and the float probs."""
    probs = predict_tta(model, images, config.tta.views, config.tta.merge)
    rles = exp.rles()
    scores, resized = [], []
    for image_id, prob in zip(ids, probs, strict=True):
        target = config.data.submission_size or sizes[image_id]
        p = resize_probs(prob, target)
        resized.append(p)
        truth = truth_masks(rles[image_id], sizes[image_id], target)
        scores.append(kaggle_dice(truth[None], p[None], 0.5)[0])
    return float(np.mean(scores)), np.stack(scores), resized


def checkpoint_factor(
    config: Any,
    model: keras.Model,
    images: np.ndarray,
    ids: list[str],
    exp: Any,
    sizes: Any,
    best_scores: np.ndarray,
    fold: int,
) -> dict[str, Any]:
    """The kept best epoch's weights vs the last epoch's (the fold's checkpoint), per class.

    Loads the last weights into ``model`` (reload the best weights after)."""
    state = load_state(config.fold_dir(fold))
    if state is None:
        return {"last_epoch": None}
    tf.train.Checkpoint(model=model).read(state["_checkpoint"]).expect_partial()
    last_dice, last_scores, _ = oof_dice(model, images, ids, exp, config, sizes)
    load_best_weights(model, config.fold_dir(fold) / BEST_WEIGHTS)
    classes = list(exp.classes)
    return {
        "best_epoch": state.get("best_epoch"),
        "last_epoch": state.get("epoch"),
        "oof_dice_best": float(best_scores.mean()),
        "oof_dice_last": last_dice,
        "per_class_best": dict(
            zip(classes, best_scores.mean(axis=0).round(4).tolist(), strict=True)
        ),
        "per_class_last": dict(
            zip(classes, last_scores.mean(axis=0).round(4).tolist(), strict=True)
        ),
    }


def recalibration_factor(
    config: Any, exp: Any, cache: Any, sizes: Any, n_classes: int
) -> dict[str, Any]:
    """OOF Dice per trained fold, moving vs re-estimated BatchNorm statistics."""
    t = config.train
    folds = [k for k in range(exp.n_folds) if (config.fold_dir(k) / BEST_WEIGHTS).is_file()]
    model = build_model(config.with_overrides(["model.encoder_weights=null"]), n_classes)
    moving, recalibrated = [], []
    for fold in folds:
        train_ids, val_ids = exp.members(fold)
        images = np.asarray(cache.images[cache.index_of(val_ids)])
        load_best_weights(model, config.fold_dir(fold) / BEST_WEIGHTS)
        moving.append(oof_dice(model, images, val_ids, exp, config, sizes)[0])
        rows = np.sort(cache.index_of(train_ids))
        usable = max(t.batch_size, len(rows) // t.batch_size * t.batch_size)
        batches = (
            np.asarray(cache.images[rows[s : s + t.batch_size]])
            for s in range(0, min(usable, len(rows)), t.batch_size)
        )
        recalibrate(model, batches)
        recalibrated.append(oof_dice(model, images, val_ids, exp, config, sizes)[0])
    return {
        "folds": folds,
        "oof_dice_moving": [round(v, 4) for v in moving],
        "oof_dice_recalibrated": [round(v, 4) for v in recalibrated],
        "mean_gain": round(float(np.mean(recalibrated) - np.mean(moving)), 4) if folds else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    if config.model.classification_head:
        parser.error(
            "quality_factors compares the plain segmentation model: set "
            "model.classification_head=false"
        )
    exp = open_experiment(config)
    weights = config.fold_dir(args.fold) / BEST_WEIGHTS
    if not weights.is_file():
        print(f"quality_factors: fold {args.fold} is not trained ({weights})", file=sys.stderr)
        return 2
    size = tuple(int(v) for v in config.data.image_size)
    cache = training_cache(config, exp, size)
    train_ids, val_ids = exp.members(args.fold)
    rows = cache.index_of(val_ids)
    images = np.asarray(cache.images[rows])
    sizes = {
        i: (int(h), int(w)) for i, (h, w) in zip(cache.image_ids, cache.original_sizes, strict=True)
    }
    n_classes = len(exp.classes)
    model = build_model(config.with_overrides(["model.encoder_weights=null"]), n_classes)
    load_best_weights(model, weights)

    factors: dict[str, Any] = {}
    factors["optimizer"] = optimizer_factor(config, n_classes, (64, 64))
    factors["batchnorm"] = batchnorm_factor(model, images[:8])
    load_best_weights(model, weights)  # the training-mode call moved the BN statistics
    factors["preprocessing"] = preprocessing_factor(config, model, images[:8])

    folder = Path(config.data.train_images)
    linear = np.stack(
        [
            cv2.resize(read_image(resolve_image_path(folder, i)), size[::-1])
            for i in val_ids  # cv2.resize's default: bilinear
        ]
    )
    area_dice, area_scores, area_probs = oof_dice(model, images, val_ids, exp, config, sizes)
    linear_dice, _, _ = oof_dice(model, linear, val_ids, exp, config, sizes)
    factors["resize"] = {
        "mean_abs_pixel_difference": float(np.abs(linear.astype(int) - images.astype(int)).mean()),
        "oof_dice_area_input": area_dice,
        "oof_dice_bilinear_input": linear_dice,
    }

    t = config.train
    batch = t.batch_size
    factors["sampler"] = {
        "train_images": len(train_ids),
        "pipeline_samples_per_epoch": (t.steps_per_epoch or len(train_ids) // batch) * batch,
        "script_samples_per_epoch": len(train_ids),
    }

    identity = config.with_overrides(["tta.views=[identity]"])
    identity_dice, _, _ = oof_dice(model, images, val_ids, exp, identity, sizes)
    rles = exp.rles()
    stored_scores, code_diff, on_threshold = [], 0.0, 0
    for image_id, prob in zip(val_ids, area_probs, strict=True):
        q = quantise_prob(prob)
        stored = dequantise_prob(q)
        code_diff = max(code_diff, float(np.abs(stored - prob).max()))
        on_threshold += int(np.count_nonzero(stored == 0.5))
        truth = truth_masks(rles[image_id], sizes[image_id], prob.shape[:2])
        stored_scores.append(kaggle_dice(truth[None], stored[None], 0.5)[0])
    factors["oof_path"] = {
        "views": list(config.tta.views),
        "oof_dice_identity_only": identity_dice,
        "oof_dice_views": area_dice,
        "uint8_store_max_prob_error": code_diff,
        "oof_dice_float_probs": float(area_scores.mean()),
        "oof_dice_uint8_store": float(np.mean(stored_scores)),
        "pixels_exactly_on_threshold": on_threshold,
    }
    # The pipeline predicts its OOF at predict.precision (auto: bfloat16 on a CPU with
    # AVX512-BF16 or AMX, float16 on a recent GPU); the script at float32.
    with precision_policy("bfloat16"):
        low = build_model(config.with_overrides(["model.encoder_weights=null"]), n_classes)
    low.set_weights(model.get_weights())
    low_dice, _, _ = oof_dice(low, images, val_ids, exp, config, sizes)
    factors["precision"] = {
        "auto_here": inference_precision("auto"),
        "oof_dice_float32": area_dice,
        "oof_dice_bfloat16": low_dice,
    }
    factors["checkpoint"] = checkpoint_factor(
        config, model, images, val_ids, exp, sizes, area_scores, args.fold
    )
    factors["bn_recalibration"] = recalibration_factor(config, exp, cache, sizes, n_classes)
    for name, values in factors.items():
        print(f"{name}: {json.dumps(values)}")
    result = {
        "benchmark": "quality_factors",
        "machine": describe_machine(),
        "config": str(args.config),
        "overrides": args.set,
        "fold": args.fold,
        "validation_images": len(val_ids),
        "factors": factors,
    }
    record(result, keep=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
