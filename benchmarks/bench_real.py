"""Real-data benchmark: the whole pipeline on DSB 2018 and on a Severstal-format copy.

Usage: ``python benchmarks/bench_real.py [--data DIR] [--quick] [--images N]
[--epochs E] [--size S] [--workdir DIR] [--csv-formats instances,image_class]
[--framework tf_keras|keras3] [--no-record]``

From ``../shared/data/dsb2018`` (664 microscopy images of nine sizes, one CSV row per
nucleus) it builds, with a seeded 80/20 split into training images and a hold-out set
whose truth the pipeline never sees:

- ``instances``: the competition's own CSV format (``ImageId,EncodedPixels``, one row per
  nucleus); every image holds nuclei, so the presence classifier has nothing to learn
  and is skipped; the submission has one row per predicted object.
- ``image_class``: Severstal's final CSV format (``ImageId,ClassId,EncodedPixels``, rows
  only for non-empty masks) with two classes, nuclei smaller (1) or larger (2) than the
  median nucleus; a fifth of the images are made clean (their nuclei inpainted away)
  and have no row at all, as Severstal's defect-free images. The image folders are
  symlinks into the data set (as DVC or git-annex keep files), except the clean images.

Each CSV format runs every stage on 2 CPU cores at a CPU-sized config (U-Net /
EfficientNet-B0 from scratch at ``--size`` pixels, flips, ``--epochs`` epochs, 3 folds,
2 at a time): segmentation folds, classifier folds, tuning, prediction of the hold-out
images with the tuned post-processing and at plain threshold 0.5, each scored against
the hold-out truth (Kaggle Dice; for instances on the union of the objects). It prints
the image counts and, per CSV format, the OOF Kaggle Dice at 0.5 (plain), after tuning
in-sample and nested, and the hold-out scores, with the wall time of each stage. The
last line is one JSON object, also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import describe_machine, record  # noqa: E402
from pipeline.core import rle  # noqa: E402
from pipeline.core.config import CONFIG_DIR, load_config  # noqa: E402
from pipeline.core.images import read_image, resolve_image_path  # noqa: E402
from pipeline.core.schema import FRAMEWORKS  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "dsb2018"
CSV_FORMATS = ("instances", "image_class")
CLEAN_FRACTION = 0.2  # Severstal format: images made defect-free (no rows)
HOLDOUT_FRACTION = 0.2


def split_ids(ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, hold-out) ids, a seeded split."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    n_hold = max(1, round(fraction * len(ids)))
    hold = sorted(ids[i] for i in order[:n_hold])
    return sorted(ids[i] for i in order[n_hold:]), hold


def link_images(source: Path, ids: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        path = resolve_image_path(source, image_id)
        (folder / path.name).symlink_to(path.resolve())


def build_instances(source: Path, rows: pd.DataFrame, train: list[str], hold: list[str],
                    out: Path) -> None:  # fmt: skip
    """DSB's own CSV format: symlinked folders, one row per nucleus."""
    link_images(source / "images", train, out / "train_images")
    link_images(source / "images", hold, out / "test_images")
    rows[rows["ImageId"].isin(train)].to_csv(out / "train.csv", index=False)
    # Some DSB nuclei overlap; a valid instances file may not, and the score is on the
    # union anyway: the truth has one union row per image.
    objects = rows[rows["ImageId"].isin(hold)].groupby("ImageId")["EncodedPixels"].agg(list)
    objects.map(rle.union_rles).reset_index().to_csv(out / "test_truth.csv", index=False)


def build_severstal(source: Path, rows: pd.DataFrame, train: list[str], hold: list[str],
                    out: Path, seed: int) -> dict[str, int]:  # fmt: skip
    """Two size classes, rows only for non-empty masks, a fifth of the images clean."""
    images = source / "images"
    areas = rows["EncodedPixels"].map(lambda r: int(np.sum(np.array(r.split()[1::2], int))))
    rows = rows.assign(ClassId=np.where(areas < float(areas.median()), 1, 2))
    ids = sorted(set(train) | set(hold))
    rng = np.random.default_rng(seed + 1)
    clean = set(rng.choice(ids, size=round(CLEAN_FRACTION * len(ids)), replace=False))
    names = {}
    for part, part_ids in (("train_images", train), ("test_images", hold)):
        folder = out / part
        folder.mkdir(parents=True)
        for image_id in part_ids:
            path = resolve_image_path(images, image_id)
            names[image_id] = path.name
            if image_id not in clean:
                (folder / path.name).symlink_to(path.resolve())
                continue
            image = cv2.cvtColor(read_image(path), cv2.COLOR_RGB2BGR)
            nuclei = rows.loc[rows["ImageId"] == image_id, "EncodedPixels"].tolist()
            union = rle.decode(rle.union_rles(nuclei), image.shape[:2])
            hole = cv2.dilate(union, np.ones((5, 5), np.uint8))
            cv2.imwrite(str(folder / path.name), cv2.inpaint(image, hole, 5, cv2.INPAINT_TELEA))
    kept = rows[~rows["ImageId"].isin(clean)]
    grouped = kept.groupby(["ImageId", "ClassId"])["EncodedPixels"].agg(list).reset_index()
    grouped["EncodedPixels"] = grouped["EncodedPixels"].map(rle.union_rles)
    grouped["ImageId"] = grouped["ImageId"].map(names)  # Severstal ids are file names
    train_names = {names[i] for i in train}
    grouped[grouped["ImageId"].isin(train_names)].to_csv(out / "train.csv", index=False)
    # The truth lists every (image, class) pair, empty ones as "", as the scorer expects.
    hold_names = sorted(names[i] for i in hold)
    full = pd.MultiIndex.from_product([hold_names, [1, 2]], names=["ImageId", "ClassId"])
    truth = grouped.set_index(["ImageId", "ClassId"])["EncodedPixels"].reindex(full, fill_value="")
    truth.reset_index().to_csv(out / "test_truth.csv", index=False)
    return {"clean_images": len(clean), "clean_train_images": len(clean & set(train))}


def write_config(out: Path, csv_format: str, args: argparse.Namespace) -> Path:
    size = [args.size, args.size]
    data: dict[str, Any] = {
        "train_csv": str(out / "train.csv"),
        "train_images": str(out / "train_images"),
        "test_images": str(out / "test_images"),
        "sample_submission": None,
        "test_truth": str(out / "test_truth.csv"),
        "csv_format": csv_format,
        "image_size": size,
        "submission_size": None,
    }
    if csv_format == "instances":
        data["instance_class"] = "nucleus"
    else:
        data["classes"] = ["1", "2"]
    config = {
        "base": str(CONFIG_DIR / "demo.yaml"),
        "experiment": f"real_{csv_format}",
        "framework": args.framework,
        "runs_dir": str(out / "runs"),
        "data": data,
        "folds": {"n_splits": 3},
        "train": {"crop_size": size, "epochs": args.epochs, "verbose": 0},
        "classifier": {"image_size": size, "epochs": args.epochs},
        "augment": [
            {"name": "HorizontalFlip", "params": {"p": 0.5}},
            {"name": "VerticalFlip", "params": {"p": 0.5}},
        ],
        "tta": {"views": ["identity", "hflip", "vflip", "hvflip"]},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_csv_format(config_path: Path, out: Path) -> dict[str, Any]:
    """Every stage; the figures of one CSV format."""
    from pipeline.run.process import enter_framework

    config = load_config(config_path)
    enter_framework(config)  # before the stages below import the Keras layer

    from pipeline.predict import predict
    from pipeline.run.experiment import open_experiment
    from pipeline.train import train_folds
    from pipeline.train_classifier import train_classifier_folds
    from pipeline.tune import tune

    exp = open_experiment(config)
    non_empty = exp.table["rle"] != ""
    with_mask = int(exp.table.loc[non_empty, "image_id"].nunique())
    seconds: dict[str, float] = {}

    def timed(name: str, call: Any) -> Any:
        start = time.perf_counter()
        result = call()
        seconds[name] = round(time.perf_counter() - start, 1)
        return result

    folds = list(range(config.folds.n_splits))
    seg = timed("segmentation", lambda: train_folds(config, folds, resume=True))
    cls = timed("classifier", lambda: train_classifier_folds(config, folds, resume=True))
    tuned = timed("tune", lambda: tune(config)).result
    subs = out / "submissions"
    final = timed("predict", lambda: predict(config, submissions_dir=subs))
    plain = timed("predict_plain", lambda: predict(config, submissions_dir=subs,
                                                   use_postprocess=False))  # fmt: skip
    n_val = sum(r["n_val"] for r in seg)
    return {
        "images_on_disk": len(exp.image_ids),
        "images_with_mask": with_mask,
        "images_without_mask": len(exp.image_ids) - with_mask,
        "holdout_images": final.get("n_images"),
        "classifier": "skipped (nothing to learn)" if not cls else "trained",
        "oof_plain_050": round(sum(r["oof_kaggle_dice_050"] * r["n_val"] for r in seg) / n_val, 4),
        "oof_tuned_in_sample": round(tuned.score, 4),
        "oof_tuned_nested": round(tuned.nested_score, 4),
        "holdout_plain_050": round(float(plain["test_score"]), 4),
        "holdout_tuned": round(float(final["test_score"]), 4),
        "submission_rows": len(pd.read_csv(final["submission"])),
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DSB 2018 folder")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/foldseg_bench_real"))
    parser.add_argument("--images", type=int, default=0, help="use the first N images (0: all)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=96, help="image side (multiple of 32)")
    # --layouts: its name before the CSV formats were renamed; older commands still run.
    parser.add_argument(
        "--csv-formats", "--layouts", dest="csv_formats", default=",".join(CSV_FORMATS)
    )
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--quick", action="store_true", help="60 images, 2 epochs, 64 px")
    parser.add_argument("--framework", choices=FRAMEWORKS, default=FRAMEWORKS[0],
                        help="the Keras layer (config key framework)")  # fmt: skip
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.size = 60, 2, 64
    csv = args.data / "train.csv"
    if not csv.is_file():
        print(f"bench_real: no DSB 2018 data at {args.data} ({csv} missing)", file=sys.stderr)
        return 2
    csv_formats = [name for name in args.csv_formats.split(",") if name]
    unknown = [name for name in csv_formats if name not in CSV_FORMATS]
    if unknown:
        print(
            f"bench_real: --csv-formats must name {list(CSV_FORMATS)}; got {unknown}",
            file=sys.stderr,
        )
        return 2
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False)
    ids = sorted(rows["ImageId"].unique())
    if args.images:
        ids = ids[: args.images]
        rows = rows[rows["ImageId"].isin(ids)]
    train, hold = split_ids(ids, HOLDOUT_FRACTION, args.seed)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for csv_format in csv_formats:
        out = args.workdir / csv_format
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.iterdir():  # the data is rebuilt; finished folds in runs/ are kept
            if stale.name != "runs":
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        extra = {}
        if csv_format == "instances":
            build_instances(args.data, rows, train, hold, out)
        else:
            extra = build_severstal(args.data, rows, train, hold, out, args.seed)
        figures = run_csv_format(write_config(out, csv_format, args), out)
        results[csv_format] = {**extra, **figures}
        print(f"{csv_format}: {json.dumps(results[csv_format])}", flush=True)
    result = {
        "benchmark": "real",
        "machine": describe_machine(),
        "data": str(args.data),
        "images": len(ids),
        "train_images": len(train),
        "holdout_images": len(hold),
        "config": {
            "size": args.size,
            "epochs": args.epochs,
            "backbone": "efficientnetb0",
            "folds": 3,
            "quick": args.quick,
        },
        "layouts": results,  # the key its recorded history (results.jsonl) uses
        "total_s": round(time.perf_counter() - started, 1),
    }
    record(result, keep=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
