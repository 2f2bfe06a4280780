"""Quality benchmark: the pipeline's raw network against a minimal Keras script, equal budget.

Usage: ``python benchmarks/bench_quality.py [--sets dsb,dsb_sparse,dsb_sizes,demo,scenes]
[--config C] [--seeds 3] [--epochs E] [--size S] [--images N] [--set KEY=VALUE ...]
[--augment flips|recipe] [--scene-images 468]
[--script-interpolation linear|area] [--workdir DIR] [--quick] [--no-record]``

For every data set and seed, the same 3 folds are trained twice at the same settings
(loss, optimizer learning rate, batch, epochs, image size, flips only, BatchNorm
momentum, callbacks):

- by the pipeline (``python -m pipeline.train --all`` on a generated config), and
- by ``benchmarks/minimal_keras.py``, a kernel-style ``model.fit`` script (plain Adam,
  ``sm.losses.JaccardLoss``, a cv2 ``Sequence``), on the split the pipeline wrote.

Both are scored the same way: OOF Kaggle Dice at threshold 0.5, no post-processing, at
the submission size, with the same flip TTA views. It prints per set the mean and
spread over the seeds, per class, and the pipeline-minus-script difference; the last
line is one JSON object, also appended to ``benchmarks/results.jsonl``.

Sets: ``dsb`` (../shared/data/dsb2018, one class, every image holds nuclei), ``dsb_sparse``
(the same images as two size classes with a fifth of them made clean, Severstal's
CSV format: the absent-class calibration case), ``dsb_sizes`` (the same images as three
classes by nucleus size, several per image, none made clean), ``demo`` (the embedded
demo, 4 classes), ``scenes`` (``make_demo_data --variant scenes``: 468 street scenes at
360x480 shaped like CamVid, two large frequent and two small sparse classes, trained at
96x128 and scored at 360x480), and ``--config C`` (any experiment a user points it at;
its settings are used as they are, with the loss, augmentation and crop made equal to
the script's). Per class and split into frequent classes (in at least 90% of the images)
and sparse ones; with the validation loss per epoch of each side (the curves).
``--set KEY=VALUE`` overrides the pipeline's config only: one factor at a time;
``--augment recipe`` gives the pipeline the recipe's flips + Affine (the script keeps
flips).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_real import DEFAULT_DATA, build_instances, build_severstal, split_ids  # noqa: E402
from benchmarks.common import describe_machine, record  # noqa: E402
from pipeline.core.config import CONFIG_DIR, Config, load_config  # noqa: E402
from pipeline.core.schema import flips_augment, recipe_augment  # noqa: E402

SETS = ("dsb", "dsb_sparse", "dsb_sizes", "demo", "scenes")
# The recipe's augmentation (the schema's augment default): flips + Affine +-45 deg.
RECIPE_AUGMENT: list[Any] = list(recipe_augment())
FLIPS_ONLY: list[Any] = list(flips_augment())
# A class present in at least this share of the images counts as frequent.
FREQUENT_SHARE = 0.9
# scenes: CamVid's shape (468 training images at 360x480, 4 classes) trained at 96x128.
SCENES_SIZE = [96, 128]
# One side's runs of a seed: image ids, OOF (N, C), each fold's best epoch and its
# validation loss per epoch.
Run = tuple[list[str], np.ndarray, list[int], list[list[float]]]


def comparable(config: dict[str, Any], size: list[int] | None, epochs: int) -> dict[str, Any]:
    """The overrides that make a pipeline config train like the minimal script."""
    train: dict[str, Any] = {
        "epochs": epochs,
        "loss": "jaccard",
        "accumulation_steps": 1,
        "verbose": 0,
        "parallel_folds": 1,
    }
    data: dict[str, Any] = {}
    if size is not None:
        data["image_size"] = size
    train["crop_size"] = size or config["data"]["image_size"]
    return {"data": data, "train": train, "augment": FLIPS_ONLY}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def build_set(name: str, args: argparse.Namespace) -> Path:
    """A config file (before the per-seed settings) for one data set."""
    out = args.workdir / name
    size = [args.size, args.size]
    data: dict[str, Any]
    if name == "scenes":
        scenes = out / "data"
        if not (scenes / "train.csv").is_file():
            from pipeline.make_demo_data import make_demo_data

            n_train = args.scene_images
            make_demo_data(scenes, n_train, 4, 360, 480, (360, 480), 12345, variant="scenes")
        base = load_config(CONFIG_DIR / "demo.yaml").to_dict()
        data = {
            "train_csv": str(scenes / "train.csv"),
            "train_images": str(scenes / "train_images"),
            "test_images": str(scenes / "test_images"),
            "sample_submission": None,
            "test_truth": None,
            "demo": False,
            "submission_size": None,  # scored at each image's own 360x480
        }
        config = _merge(base, {"data": data})
        config = _merge(config, comparable(config, SCENES_SIZE, args.epochs))
    elif name == "demo":
        demo = out / "data"
        if not (demo / "train.csv").is_file():
            from pipeline.make_demo_data import main as make_demo

            make_demo(["--out", str(demo)])
        base = load_config(CONFIG_DIR / "demo.yaml").to_dict()
        data = {
            "train_csv": str(demo / "train.csv"),
            "train_images": str(demo / "train_images"),
            "test_images": str(demo / "test_images"),
            "sample_submission": str(demo / "sample_submission.csv"),
            "test_truth": str(demo / "test_truth.csv"),
        }
        config = _merge(base, {"data": data})
        config = _merge(config, comparable(config, None, args.epochs))
    else:
        if not (args.data / "train.csv").is_file():
            raise SystemExit(f"bench_quality: no DSB 2018 data at {args.data}")
        if not (out / "train.csv").is_file():
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            rows = pd.read_csv(args.data / "train.csv", dtype=str, keep_default_na=False)
            ids = sorted(rows["ImageId"].unique())[: args.images or None]
            rows = rows[rows["ImageId"].isin(ids)]
            train, hold = split_ids(ids, 0.2, 12345)
            if name == "dsb":
                build_instances(args.data, rows, train, hold, out)
            elif name == "dsb_sizes":
                build_sizes(args.data, rows, train, out)
            else:
                build_severstal(args.data, rows, train, hold, out, 12345)
        data = {
            "train_csv": str(out / "train.csv"),
            "train_images": str(out / "train_images"),
            "test_images": str(out / "test_images"),
            "sample_submission": None,
            "test_truth": None,
            "csv_format": "instances" if name == "dsb" else "image_class",
            "submission_size": None,
        }
        if name == "dsb":
            data["instance_class"] = "nucleus"
        else:
            data["classes"] = ["1", "2", "3"] if name == "dsb_sizes" else ["1", "2"]
        config = _merge(load_config(CONFIG_DIR / "demo.yaml").to_dict(), {"data": data})
        config = _merge(config, comparable(config, size, args.epochs))
    if args.augment == "recipe":
        config["augment"] = RECIPE_AUGMENT
    config["train"]["lr"] = args.lr
    config["train"]["batch_size"] = args.batch_size
    config = _merge(config, {"runs_dir": str(out / "runs")})
    path = out / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def build_sizes(source: Path, rows: pd.DataFrame, train: list[str], out: Path) -> None:
    """DSB recast as three classes by nucleus size (the area's tertiles): small, middle
    and large nuclei, several classes per image, Severstal's CSV (rows only for
    non-empty masks, file names as ids). Only the training part is written."""
    from pipeline.core import rle
    from pipeline.core.images import resolve_image_path

    areas = rows["EncodedPixels"].map(lambda r: int(np.sum(np.array(r.split()[1::2], int))))
    cuts = np.quantile(areas, [1 / 3, 2 / 3])
    rows = rows.assign(ClassId=1 + np.searchsorted(cuts, areas, side="right"))
    rows = rows[rows["ImageId"].isin(set(train))]
    folder = out / "train_images"
    folder.mkdir(parents=True)
    names = {}
    for image_id in train:
        path = resolve_image_path(source / "images", image_id)
        names[image_id] = path.name
        (folder / path.name).symlink_to(path.resolve())
    (out / "test_images").mkdir()
    grouped = rows.groupby(["ImageId", "ClassId"])["EncodedPixels"].agg(list).reset_index()
    grouped["EncodedPixels"] = grouped["EncodedPixels"].map(rle.union_rles)
    grouped["ImageId"] = grouped["ImageId"].map(names)
    grouped.to_csv(out / "train.csv", index=False)


def user_set(path: Path, args: argparse.Namespace) -> Path:
    config = load_config(path).to_dict()
    config = _merge(config, comparable(config, None, args.epochs))
    config["runs_dir"] = str(args.workdir / "user" / "runs")
    out = args.workdir / "user" / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config))
    return out


def run_pipeline(config: Config, only: list[int] | None = None) -> Run:
    """The pipeline's folds (resumable): image ids, OOF (N, C) per image and class from
    its stores, each fold's best epoch and its validation loss per epoch."""
    from pipeline.core.masks import truth_masks
    from pipeline.core.metrics import kaggle_dice
    from pipeline.core.probstore import ProbReader, dequantise_prob
    from pipeline.run.experiment import open_experiment
    from pipeline.train import train_folds

    folds = only if only is not None else list(range(config.folds.n_splits))
    results = train_folds(config, folds, resume=True)
    exp = open_experiment(config)
    rles = exp.rles()
    sizes = _original_sizes(config, exp.image_ids)
    scores, ids = [], []
    for fold in folds:
        reader = ProbReader(config.fold_dir(fold) / "oof")
        for image_id, q in reader.iter():
            ids.append(image_id)
            prob = np.moveaxis(dequantise_prob(q), 0, -1)
            truth = truth_masks(rles[image_id], sizes[image_id], prob.shape[:2])
            scores.append(kaggle_dice(truth[None], prob[None], 0.5)[0])
    curves = [
        pd.read_csv(config.fold_dir(k) / "history.csv")["val_loss"].round(4).tolist() for k in folds
    ]
    return ids, np.stack(scores), [int(r["best_epoch"]) for r in results], curves


def _original_sizes(config: Config, image_ids: list[str]) -> dict[str, tuple[int, int]]:
    from pipeline.run.experiment import open_experiment
    from pipeline.run.image_cache import training_cache

    exp = open_experiment(config)
    cache = training_cache(config, exp, config.data.image_size)
    return {
        i: (int(h), int(w)) for i, (h, w) in zip(cache.image_ids, cache.original_sizes, strict=True)
    }


def run_script(config: Config, interpolation: str, only: list[int] | None = None) -> Run:
    """The minimal script on the pipeline's split: image ids, OOF (N, C) per image and
    class, each fold's best epoch and its validation loss per epoch."""
    from benchmarks import minimal_keras
    from pipeline.core.images import resolve_image_path
    from pipeline.run.experiment import open_experiment

    exp = open_experiment(config)
    rles = exp.rles()
    paths = {i: resolve_image_path(Path(config.data.train_images), i) for i in exp.image_ids}
    settings = minimal_keras.settings_from_config(config, len(exp.classes), interpolation)
    # A finished fold is kept (keyed by its settings and split), so a rerun with more
    # seeds trains only what is new, as the pipeline's finished folds are kept.
    scores, ids, best, curves = [], [], [], []
    for fold in only if only is not None else range(config.folds.n_splits):
        train_ids, val_ids = exp.members(fold)
        ids.extend(val_ids)
        key = hashlib.sha256(
            json.dumps([settings, train_ids, val_ids], sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        done = config.run_dir / f"script_fold_{fold}_{key}.npz"
        if not done.is_file():
            out = minimal_keras.train_fold(paths, rles, train_ids, val_ids, settings)
            np.savez(
                done,
                per_image=out["per_image"],
                best_epoch=out["best_epoch"],
                val_loss=np.asarray(out["history"]["val_loss"]),
                history=json.dumps(out["history"]),
            )
        saved = np.load(done)
        scores.append(saved["per_image"])
        best.append(int(saved["best_epoch"]))
        curves.append(saved["val_loss"].round(4).tolist() if "val_loss" in saved else [])
    return ids, np.concatenate(scores), best, curves


def frequent_classes(classes: list[str], rles: dict[str, list[str]]) -> list[str]:
    """The classes present in at least ``FREQUENT_SHARE`` of the images."""
    present = np.array([[bool(r) for r in v] for v in rles.values()])
    return [c for c, share in zip(classes, present.mean(axis=0), strict=True)
            if share >= FREQUENT_SHARE]  # fmt: skip


def summarise(runs: list[Run], classes: list[str], rles: dict[str, list[str]]) -> dict[str, Any]:
    """Mean and spread over seeds; per class the Kaggle Dice, the share of absent-class
    images given a mask anyway (false positives) and the Dice where the class is present."""
    means = [float(scores.mean()) for _, scores, _, _ in runs]
    per_class, false_positive, present_dice = [], [], []
    for ids, scores, _, _ in runs:
        present = np.array([[bool(r) for r in rles[i]] for i in ids])  # (N, C)
        per_class.append(scores.mean(axis=0))
        # On an absent class, the Kaggle Dice is 1 for an empty mask and 0 for any mask.
        false_positive.append(
            [float((scores[~present[:, c], c] < 1).mean()) for c in range(len(classes))]
        )
        present_dice.append([float(scores[present[:, c], c].mean()) for c in range(len(classes))])

    def by_class(values: list[Any]) -> dict[str, float]:
        mean = np.nanmean(np.asarray(values, dtype=np.float64), axis=0)
        return {c: round(float(v), 4) for c, v in zip(classes, mean, strict=True)}

    frequent = frequent_classes(classes, rles)
    groups = {}
    for group, members in (
        ("frequent", frequent),
        ("sparse", [c for c in classes if c not in frequent]),
    ):
        if members:
            cols = [classes.index(c) for c in members]
            seeds = [float(scores[:, cols].mean()) for _, scores, _, _ in runs]
            groups[group] = {
                "classes": members,
                "mean": round(float(np.mean(seeds)), 4),
                "std": round(float(np.std(seeds)), 4),
            }
    return {
        "by_frequency": groups,
        "mean": round(float(np.mean(means)), 4),
        "std": round(float(np.std(means)), 4),
        "seeds": [round(m, 4) for m in means],
        "per_class": by_class(per_class),
        "absent_class_false_positive_rate": by_class(false_positive),
        "present_class_dice": by_class(present_dice),
        "best_epochs": [best for _, _, best, _ in runs],
        # Mean over folds and seeds of the validation Jaccard loss after each epoch
        # (the same loss on both sides; epochs cut short by early stopping left out).
        "val_loss_by_epoch": _mean_curve([c for *_, curves in runs for c in curves]),
    }


def _mean_curve(curves: list[list[float]]) -> list[float]:
    curves = [c for c in curves if c]
    if not curves:
        return []
    n = max(len(c) for c in curves)
    return [round(float(np.mean([c[e] for c in curves if len(c) > e])), 4) for e in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--config", type=Path, help="also compare on this experiment")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DSB 2018 folder")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/foldseg_bench_quality"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=64, help="DSB image side (multiple of 32)")
    parser.add_argument("--images", type=int, default=0, help="DSB: the first N images (0: all)")
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the pipeline's config (one factor at a time)")  # fmt: skip
    parser.add_argument("--tag", help="name of the --set variant (its experiments' suffix)")
    parser.add_argument("--script-interpolation", default="linear", choices=("linear", "area"))
    parser.add_argument("--only", choices=("pipeline", "script"), help="run one side only")
    parser.add_argument("--augment", default="flips", choices=("flips", "recipe"),
                        help="the pipeline's augmentation: flips (as the script) or the "
                        "recipe's flips + Affine +-45 deg (the script keeps flips)")  # fmt: skip
    parser.add_argument("--folds", help="only these folds, e.g. 0 or 0,1 (a quicker screen)")
    parser.add_argument("--scene-images", type=int, default=468,
                        help="scenes: training images (CamVid's 468)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 60 DSB images")
    parser.add_argument("--note", help="a note kept with the record")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.images = 1, 2, 60
    names = [n for n in args.sets.split(",") if n]
    unknown = [n for n in names if n not in SETS]
    if unknown:
        print(f"bench_quality: --sets must name {list(SETS)}; got {unknown}", file=sys.stderr)
        return 2
    paths = {n: build_set(n, args) for n in names}
    if args.config is not None:
        paths["user"] = user_set(args.config, args)
    tag = args.tag or "-".join(s.replace("=", "_").replace(".", "_") for s in args.set)
    if args.augment == "recipe":
        tag = f"{tag}-recipe" if tag else "recipe"
    if not all(c.isalnum() or c in "_-" for c in tag):
        print(f"bench_quality: name the --set variant with --tag (got {tag!r})", file=sys.stderr)
        return 2
    folds = [int(k) for k in args.folds.split(",")] if args.folds else None
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name, path in paths.items():
        base = load_config(path)
        sides: dict[str, list[Run]] = {"pipeline": [], "script": []}
        seconds = {"pipeline": 0.0, "script": 0.0}
        for k in range(args.seeds):
            seed = 12345 + k
            config = base.with_overrides(
                [
                    f"seed={seed}",
                    f"experiment=q_{name}_s{seed}{'_' + tag if tag else ''}",
                    *args.set,
                ]
            )
            for side in ("pipeline", "script"):
                if args.only and side != args.only:
                    continue
                clock = time.perf_counter()
                if side == "pipeline":
                    runs = run_pipeline(config, folds)
                else:
                    # The split is the pipeline's: written by open_experiment if not yet.
                    runs = run_script(config, args.script_interpolation, folds)
                seconds[side] += time.perf_counter() - clock
                sides[side].append(runs)
                scores = runs[1]
                print(f"{name} seed {seed} {side}: OOF Kaggle Dice at 0.5 = {scores.mean():.4f} "
                      f"per class {np.round(scores.mean(0), 4).tolist()}", flush=True)  # fmt: skip
        from pipeline.run.experiment import open_experiment

        exp = open_experiment(base)
        results[name] = {
            side: {**summarise(runs, exp.classes, exp.rles()), "seconds": round(seconds[side], 1)}
            for side, runs in sides.items()
            if runs
        }
        if sides["pipeline"] and sides["script"]:
            diff = results[name]["pipeline"]["mean"] - results[name]["script"]["mean"]
            results[name]["pipeline_minus_script"] = round(diff, 4)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    result = {
        "benchmark": "quality",
        "machine": describe_machine(),
        "settings": {
            "epochs": args.epochs,
            "size": SCENES_SIZE if names == ["scenes"] else args.size,
            "images": args.images or "all",
            "seeds": args.seeds,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "pipeline_overrides": args.set,
            "script_interpolation": args.script_interpolation,
            "augment": args.augment,
            "folds": folds or "all",
        },
        "sets": results,
        "total_s": round(time.perf_counter() - started, 1),
        **({"note": args.note} if args.note else {}),
    }
    record(result, keep=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
