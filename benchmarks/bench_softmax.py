"""Sigmoid against softmax on a generated index-coded set of mutually exclusive classes.

Usage: ``python benchmarks/bench_softmax.py [--workdir DIR] [--n-train N] [--size S]
[--classes C] [--epochs E] [--fold K] [--no-record]``

``tests/exclusive_data.make_indexed_data`` writes ``--n-train`` images of ``--size``
pixels with ``--classes`` exclusive classes (one class per pixel) and a ring of void
pixels round every shape. Two experiments that differ only in ``model.activation``
(sigmoid, the recipe's, and softmax) train fold ``--fold`` of a 2-fold split
(``foldseg train --fold K``: U-Net / ResNet-18 from scratch, ``--epochs`` epochs, the
same seed, crops, batch and learning rate). Both OOF stores are then scored the same
way, void pixels left out of truth and prediction: the sigmoid's masks at threshold
0.5, the softmax's argmax masks. The figure is the OOF Kaggle Dice of that fold's
validation images (not nested, no post-processing), one seed. The last line is one
JSON object, also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import describe_machine, record  # noqa: E402
from pipeline.core.config import CONFIG_DIR  # noqa: E402
from pipeline.core.exclusive import argmax_masks, mask_labels, without_void  # noqa: E402
from pipeline.core.metrics import kaggle_dice  # noqa: E402
from pipeline.core.probstore import ProbReader  # noqa: E402
from tests.exclusive_data import VOID, indexed_data_section, make_indexed_data  # noqa: E402


def write_config(work: Path, data: Path, args: argparse.Namespace, activation: str) -> Path:
    size = [args.size, args.size]
    section: dict[str, Any] = {**indexed_data_section(data, args.classes), "image_size": size}
    section["submission_size"] = None
    config = {
        "base": str(CONFIG_DIR / "demo.yaml"),
        "experiment": activation,
        "runs_dir": str(work / "runs"),
        "data": section,
        "folds": {"n_splits": 2},
        "model": {"backbone": "resnet18", "encoder_weights": None, "activation": activation},
        "train": {
            "crop_size": size,
            "batch_size": 8,
            "accumulation_steps": 1,
            "epochs": args.epochs,
            "verbose": 0,
            "parallel_folds": 1,
        },
        "tta": {"views": ["identity"], "batch_size": 8},
    }
    path = work / f"{activation}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def score(store: Path, data: Path, activation: str) -> dict[str, Any]:
    """OOF Kaggle Dice (mean over images and classes), void pixels out; and the share of
    non-void pixels whose label (background included) is right."""
    dice, right, total = [], 0, 0
    for image_id, q in ProbReader(store).iter():
        mask = np.asarray(Image.open(data / "masks" / image_id))
        void = (mask == VOID).astype(np.uint8)
        n = len(q)
        truth = (mask[..., None] == np.arange(1, n + 1)).astype(np.uint8)
        probs = np.asarray(q, np.float32).transpose(1, 2, 0) / 255.0
        pred = argmax_masks(probs) if activation == "softmax" else (probs >= 0.5).astype(np.uint8)
        truth, pred = without_void(truth, void), without_void(pred, void)
        dice.append(kaggle_dice(truth[None], pred[None], 0.5)[0])
        keep = void == 0
        right += int((mask_labels(truth) == mask_labels(pred))[keep].sum())
        total += int(keep.sum())
    per_image = np.stack(dice)
    return {
        "oof_kaggle_dice": round(float(per_image.mean()), 4),
        "per_class": [round(float(v), 4) for v in per_image.mean(axis=0)],
        "pixel_accuracy": round(right / max(total, 1), 4),
        "n_images": len(per_image),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_softmax"))
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    work = args.workdir
    data = make_indexed_data(
        work / "data", args.n_train, 2, args.size, args.size, args.classes, seed=11
    )
    result: dict[str, Any] = {
        "benchmark": "softmax",
        "machine": describe_machine(),
        "figure": f"OOF Kaggle Dice of fold {args.fold}'s validation images, void pixels out, "
        "no post-processing, one seed",
        "n_train": args.n_train,
        "size": args.size,
        "classes": args.classes,
        "epochs": args.epochs,
    }
    for activation in ("sigmoid", "softmax"):
        config = write_config(work, data, args, activation)
        start = time.perf_counter()
        command = [sys.executable, "-m", "pipeline.train", "--config", str(config)]
        done = subprocess.run([*command, "--fold", str(args.fold), "--force"], cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"training {activation} exited {done.returncode}")
        seconds = round(time.perf_counter() - start, 1)
        store = work / "runs" / activation / f"fold_{args.fold}" / "oof"
        result[activation] = {**score(store, data, activation), "train_s": seconds}
    record(result, keep=not args.no_record)


if __name__ == "__main__":
    main()
