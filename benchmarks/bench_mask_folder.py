"""Mask-folder benchmark: DSB 2018 read from its CSV and from a mask-folder copy.

Usage: ``python benchmarks/bench_mask_folder.py [--data DIR] [--workdir DIR] [--size S]
[--epochs E] [--no-train] [--no-record]``

From ``../shared/data/dsb2018`` (664 images, one CSV row per nucleus) ``foldseg
convert`` writes a binary mask folder (one PNG per image, the union of its nuclei).
Two experiments that differ only in their mask source (``data.train_csv`` or
``data.masks``) are then opened at the same seed: the benchmark checks that their
``folds.csv`` are byte-identical and their mask tables equal, and (unless
``--no-train``) trains every fold of each (``foldseg train --all``: U-Net /
EfficientNet-B0 from scratch at ``--size`` pixels, ``--epochs`` epochs) and prints both
OOF Kaggle Dice at threshold 0.5 (the folds' validation images, weighted by their
count). Training on a CPU is not bit-reproducible, so the two OOF figures may differ in
the last digits (see docs/architecture.md#reproducibility). The last line is one JSON
object, also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import describe_machine, record  # noqa: E402
from pipeline.core.config import CONFIG_DIR, load_config  # noqa: E402
from pipeline.run.experiment import open_experiment  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "dsb2018"


def foldseg(*args: str) -> float:
    """Run a stage; its wall time in seconds (exit code checked)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {done.returncode}")
    return time.perf_counter() - start


def set_args(values: list[str]) -> list[str]:
    return [part for value in values for part in ("--set", value)]


def overrides(data: Path, work: Path, size: int, epochs: int) -> list[str]:
    return [
        f"runs_dir={work / 'runs'}",
        f"data.train_images={data / 'images'}",
        f"data.test_images={data / 'images'}",
        f"data.image_size=[{size},{size}]",
        f"train.crop_size=[{size},{size}]",
        f"classifier.image_size=[{size},{size}]",
        "model.backbone=efficientnetb0",
        "model.encoder_weights=null",
        f"train.epochs={epochs}",
        "train.batch_size=8",
        "train.accumulation_steps=1",
        "train.verbose=0",
        "train.parallel_folds=1",
        "tta.views=[identity]",
    ]


def oof_dice(run_dir: Path, n_folds: int) -> float:
    """The OOF Kaggle Dice at 0.5 over every fold's validation images."""
    metrics = [
        json.loads((run_dir / f"fold_{k}" / "metrics.json").read_text()) for k in range(n_folds)
    ]
    n_val = sum(m["n_val"] for m in metrics)
    return sum(m["oof_kaggle_dice_050"] * m["n_val"] for m in metrics) / n_val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_mask_folder"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not (args.data / "train.csv").is_file():
        raise SystemExit(f"no DSB 2018 data in {args.data}")
    data = args.data.resolve()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    common = overrides(data, work, args.size, args.epochs)
    masks = work / "masks"
    base = str(CONFIG_DIR / "dsb2018.yaml")
    sets = {
        "csv": [*common, "experiment=dsb_csv", f"data.train_csv={data / 'train.csv'}"],
        "masks": [*common, "experiment=dsb_masks", "data.train_csv=null", f"data.masks={masks}"],
    }
    convert_s = foldseg(
        "pipeline.convert", "--config", base, *set_args(sets["csv"]),
        "--to-masks", str(masks),
    )  # fmt: skip
    configs = {name: load_config(base, values) for name, values in sets.items()}
    exps = {name: open_experiment(config) for name, config in configs.items()}
    same_folds = (configs["csv"].run_dir / "folds.csv").read_bytes() == (
        configs["masks"].run_dir / "folds.csv"
    ).read_bytes()
    same_table = exps["csv"].table.equals(exps["masks"].table)
    result: dict[str, Any] = {
        "benchmark": "mask_folder",
        "data": "dsb2018",
        "images": len(exps["csv"].image_ids),
        "mask_files": len(list(masks.glob("*.png"))),
        "convert_s": round(convert_s, 1),
        "same_folds_csv": same_folds,
        "same_mask_table": same_table,
        "size": args.size,
        "epochs": args.epochs,
        "machine": describe_machine(),
    }
    print(f"folds.csv identical: {same_folds}; mask tables equal: {same_table}")
    if not args.no_train:
        for name, values in sets.items():
            seconds = foldseg(
                "pipeline.train", "--config", base, *set_args(values),
                "--all",
            )  # fmt: skip
            n_folds = int(configs[name].folds.n_splits)
            score = oof_dice(configs[name].run_dir, n_folds)
            result[f"oof_kaggle_dice_050_{name}"] = round(score, 4)
            result[f"train_s_{name}"] = round(seconds, 1)
            print(f"{name}: OOF Kaggle Dice at 0.5 {score:.4f} (train --all {seconds:.0f} s)")
    frame = pd.DataFrame([result]).drop(columns=["machine"])
    print(frame.to_string(index=False))
    record(result, keep=not args.no_record)


if __name__ == "__main__":
    main()
