"""The embedded demo data set: a generated, Kaggle-format, Clouds-like set.

``python -m pipeline.make_demo_data`` writes, under ``data/demo/``:

- ``train.csv`` (``Image_Label,EncodedPixels``, one row per image and class, as in
  Understanding Clouds) and ``train_images/*.jpg``;
- ``test_images/*.jpg``, ``sample_submission.csv`` (every test image x class, ``1 1``);
- ``test_truth.csv``: the hidden truth of the test images, in the train.csv format, at
  the submission size (masks resized with nearest neighbour);
- ``demo_meta.json``: the parameters, so a second run with the same ones is a no-op.

The images and masks are drawn by ``pipeline.core.demo_data`` (each class a distinct
texture filling boxes on a cloudless noisy background). Every image comes from its own
generator seeded by ``(seed, split, index)``, so an image never depends on how many
others are made, and images are streamed to disk one at a time (by ``--workers``
processes) so the full Clouds-size preset fits in memory. This module holds the CLI,
the argument checks and the file writing.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.core.atomic import atomic_path, write_bytes, write_text
from pipeline.core.demo_data import (
    CLASSES,
    GENERATOR_VERSION,
    draw_image_ids,
    draw_sample,
    make_image_rng,
)
from pipeline.core.demo_scenes import SCENE_CLASSES, draw_scene
from pipeline.core.rle import encode_batch
from pipeline.run.command import Command, parse_size

logger = logging.getLogger(__name__)

META_FILE = "demo_meta.json"
CSV_HEADER = "Image_Label,EncodedPixels\n"
_CLOUDS_PRESET: dict[str, Any] = {
    "n_train": 5546,
    "n_test": 3698,
    "height": 1400,
    "width": 2100,
    "truth_size": (350, 525),
}
DEFAULTS: dict[str, Any] = {
    "n_train": 300,
    "n_test": 100,
    "height": 160,
    "width": 240,
    "truth_size": (80, 120),
    "seed": 12345,
}
# ``--variant scenes``: street scenes shaped like CamVid (468 + 233 images at 360x480).
_SCENES_PRESET: dict[str, Any] = {
    "n_train": 468,
    "n_test": 233,
    "height": 360,
    "width": 480,
    "truth_size": (360, 480),
}
VARIANTS = ("clouds", "scenes")
SCENES_VERSION = 1


def variant_classes(variant: str) -> tuple[str, ...]:
    """The class names a variant writes, in CSV order."""
    return SCENE_CLASSES if variant == "scenes" else CLASSES


def make_demo_data(
    out: Path,
    n_train: int,
    n_test: int,
    height: int,
    width: int,
    truth_size: tuple[int, int],
    seed: int,
    force: bool = False,
    workers: int = 1,
    variant: str = "clouds",
) -> Path:
    """Write the demo data set into ``out`` (skipped if already there with these parameters).

    Args:
        out: output folder (created).
        n_train, n_test: number of training and test images (>= 1).
        height, width: image size in pixels (>= 16).
        truth_size: (H, W) of the masks in ``test_truth.csv`` (the submission size).
        seed: the data set's seed.
        force: regenerate even if ``out`` already holds a complete set.
        workers: processes drawing images in parallel; the output does not depend on it.
        variant: ``clouds`` (the demo: textured boxes, ``core.demo_data``) or ``scenes``
            (street scenes with two large frequent and two small sparse classes,
            ``core.demo_scenes``).

    Returns:
        ``out``.

    Raises:
        ValueError: bad arguments, or ``out`` holds a complete set made with other
            parameters (or a ``train.csv`` not made here) and ``force`` is False.
    """
    out = Path(out)
    meta = _check_arguments(n_train, n_test, height, width, truth_size, seed, variant)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1; got {workers!r}")
    _check_output_folder(out)
    train_csv = out / "train.csv"
    saved = _read_meta(out)
    if not force and train_csv.exists():
        if saved is None:
            raise ValueError(
                f"{train_csv} exists but {out / META_FILE} does not, so it was not written "
                "by make_demo_data; choose another --out, or pass --force to overwrite it"
            )
        if _is_complete(out):
            if saved == meta:
                logger.info("demo data already present in %s (same parameters)", out)
                return out
            changed = sorted(
                key for key in meta.keys() | saved.keys() if saved.get(key) != meta.get(key)
            )
            differences = ", ".join(
                f"{key}: {saved.get(key)} -> {meta.get(key)}" for key in changed
            )
            raise ValueError(
                f"{out} already holds demo data made with other parameters ({differences}); "
                "pass --force to regenerate it, or choose another --out"
            )
    # The CSVs mark a finished set, so they go first (train.csv, the one checked, before
    # the rest) and come back last: an interrupted run is never taken for a complete one.
    for name in ("train.csv", "sample_submission.csv", "test_truth.csv"):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    # Images left by an earlier generation are only deleted where that generation was
    # ours (a meta file existed), never in a folder of someone else's images.
    remove_stale = saved is not None

    start = time.perf_counter()
    train_ids, test_ids = draw_image_ids(seed, n_train, n_test)
    sizes = (height, width, truth_size)
    options = (remove_stale, workers, variant)
    # Renamed into place in reverse order as the blocks end: train.csv last.
    with (
        atomic_path(train_csv) as tmp_train,
        atomic_path(out / "test_truth.csv") as tmp_truth,
        atomic_path(out / "sample_submission.csv") as tmp_sample,
    ):
        _write_split(out, "train", train_ids, sizes, seed, options, tmp_train)
        _write_split(out, "test", test_ids, sizes, seed, options, tmp_truth)
        _write_sample_submission(test_ids, tmp_sample, variant_classes(variant))
    elapsed = time.perf_counter() - start
    logger.info(
        "wrote %d train + %d test images (%dx%d) to %s in %.1f s (%.1f images/s)",
        n_train,
        n_test,
        height,
        width,
        out,
        elapsed,
        (n_train + n_test) / elapsed,
    )
    return out


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder")
    parser.add_argument("--n-train", type=int, help="training images (default 300)")
    parser.add_argument("--n-test", type=int, help="test images (default 100)")
    parser.add_argument("--height", type=int, help="image height (default 160)")
    parser.add_argument("--width", type=int, help="image width (default 240)")
    parser.add_argument(
        "--truth-size", type=parse_size, help="HxW of test_truth.csv masks (default 80x120)"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULTS["seed"], help="seed (default %(default)s)"
    )
    parser.add_argument(
        "--clouds-size",
        action="store_true",
        help="benchmark preset: 5546 train + 3698 test images at 1400x2100, truth at "
        "350x525, about 10 GB of JPEGs (options given explicitly still override it)",
    )
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="clouds",
        help="clouds: the demo (default); scenes: street scenes, 2 large frequent + 2 small "
        "sparse classes, 468 + 233 images at 360x480 unless given",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes drawing images (default 1; use the core count for --clouds-size)",
    )


def _run(args: argparse.Namespace) -> int:
    preset = _CLOUDS_PRESET if args.clouds_size else DEFAULTS
    if args.variant == "scenes" and not args.clouds_size:
        preset = {**DEFAULTS, **_SCENES_PRESET}

    def pick(key: str) -> Any:
        value = getattr(args, key)
        return preset[key] if value is None else value

    try:
        out = make_demo_data(
            out=args.out,
            n_train=pick("n_train"),
            n_test=pick("n_test"),
            height=pick("height"),
            width=pick("width"),
            truth_size=pick("truth_size"),
            seed=args.seed,
            force=args.force,
            workers=args.workers,
            variant=args.variant,
        )
    except OSError as error:  # e.g. a read-only or special file system under --out
        raise ValueError(f"cannot write the demo data to {args.out}: {error}") from None
    print(f"demo data in {out}")
    return 0


COMMAND = Command(
    stage="demo-data",
    description=__doc__,
    add_arguments=_add_arguments,
    run=_run,
    examples=("", "--out data/demo --force"),
    uses_config=False,
)

main = COMMAND.main


def _check_output_folder(out: Path) -> None:
    """``out`` must be a folder, or creatable as one, before anything is drawn."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; expected a folder (made if absent)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {str(out)!r} cannot be made: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r} cannot be made: {str(parent)!r} is not writable")


@dataclass(frozen=True)
class _SplitJob:
    """What a worker needs to render one split's images (picklable)."""

    seed: int
    split: str
    image_dir: Path
    height: int
    width: int
    mask_size: tuple[int, int] | None
    variant: str = "clouds"


def _write_split(
    out: Path,
    split: str,
    image_ids: list[str],
    sizes: tuple[int, int, tuple[int, int]],
    seed: int,
    options: tuple[bool, int, str],
    tmp_csv: Path,
) -> None:
    """Write a split's images and stream its label CSV to ``tmp_csv`` (a temporary file).

    Rows are in image-id order, classes in ``CLASSES`` order, as in the Kaggle files. The
    train CSV holds image-size masks; the test one (the truth) holds ``truth_size`` masks.
    ``options`` is (remove stale images, number of worker processes, variant).
    """
    height, width, truth_size = sizes
    remove_stale, workers, variant = options
    image_dir = out / f"{split}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_size = truth_size if split == "test" else None
    job = _SplitJob(seed, split, image_dir, height, width, mask_size, variant)
    order = sorted(range(len(image_ids)), key=image_ids.__getitem__)
    tasks = [(job, index, image_ids[index]) for index in order]
    start = time.perf_counter()
    with open(tmp_csv, "w", newline="\n") as csv, ExitStack() as stack:
        csv.write(CSV_HEADER)
        if workers > 1:
            # Spawned, not forked: the caller may hold threads (TensorFlow's, in pipeline.demo).
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
            rows: Iterator[str] = pool.map(_render_image, tasks, chunksize=4)
        else:
            rows = map(_render_image, tasks)
        for done, text in enumerate(rows, start=1):
            csv.write(text)
            if done % 500 == 0:
                rate = done / (time.perf_counter() - start)
                logger.info("%s: %d/%d images (%.1f/s)", split, done, len(tasks), rate)
    if remove_stale:
        _remove_stale_images(image_dir, set(image_ids))


def _render_image(task: tuple[_SplitJob, int, str]) -> str:
    """Draw image ``index`` from its own generator, write its JPEG, return its CSV rows."""
    job, index, image_id = task
    rng = make_image_rng(job.seed, job.split, index)
    draw = draw_scene if job.variant == "scenes" else draw_sample
    classes = variant_classes(job.variant)
    image, masks = draw(rng, job.height, job.width)
    _write_jpeg(job.image_dir / image_id, image)
    mask_list = [masks[name] for name in classes]
    if job.mask_size is not None:
        size = (job.mask_size[1], job.mask_size[0])
        mask_list = [cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for m in mask_list]
    rles = encode_batch(mask_list)
    return "".join(f"{image_id}_{name},{rle}\n" for name, rle in zip(classes, rles, strict=True))


def _write_sample_submission(test_ids: list[str], tmp: Path, classes: tuple[str, ...]) -> None:
    """Kaggle-style sample submission (every test image x class, ``1 1``) to ``tmp``."""
    rows = [f"{image_id}_{name},1 1\n" for image_id in sorted(test_ids) for name in classes]
    tmp.write_text(CSV_HEADER + "".join(rows))


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image as JPEG quality 95, atomically."""
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    assert ok, "OpenCV failed to encode an in-memory uint8 image"
    write_bytes(path, data.tobytes())


def _remove_stale_images(image_dir: Path, keep: set[str]) -> None:
    """Delete images (and leftover temporaries) of an earlier, different generation."""
    for path in image_dir.iterdir():
        if path.is_file() and path.name not in keep and path.suffix in {".jpg", ".tmp"}:
            path.unlink()


def _check_arguments(
    n_train: int,
    n_test: int,
    height: int,
    width: int,
    truth_size: tuple[int, int],
    seed: int,
    variant: str = "clouds",
) -> dict[str, object]:
    """Validate the parameters and return them as the ``demo_meta.json`` record (the
    default variant's record names no variant, as before variants existed)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}; got {variant!r}")
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_test", n_test, 1),
        ("height", height, 16),
        ("width", width, 16),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if (
        not isinstance(truth_size, (tuple, list))
        or len(truth_size) != 2
        or not all(isinstance(side, (int, np.integer)) and side >= 1 for side in truth_size)
    ):
        raise ValueError(f"truth_size must be (H, W) with positive integers; got {truth_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    meta: dict[str, object] = {
        "generator_version": GENERATOR_VERSION,
        "n_train": int(n_train),
        "n_test": int(n_test),
        "height": int(height),
        "width": int(width),
        "truth_size": [int(truth_size[0]), int(truth_size[1])],
        "seed": int(seed),
        "classes": list(variant_classes(variant)),
    }
    if variant != "clouds":
        meta |= {"variant": variant, "generator_version": SCENES_VERSION}
    return meta


def _read_meta(out: Path) -> dict[str, object] | None:
    """The recorded parameters of the set in ``out``, or None if there is no record."""
    path = out / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); pass --force to regenerate"
        ) from None
    return meta if isinstance(meta, dict) else {}


def _is_complete(out: Path) -> bool:
    """True when every CSV of a finished run is present."""
    names = ("train.csv", "test_truth.csv", "sample_submission.csv", META_FILE)
    return all((out / name).is_file() for name in names)


if __name__ == "__main__":
    raise SystemExit(main())
