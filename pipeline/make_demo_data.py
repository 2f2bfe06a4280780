"""The embedded demo data set: a generated, Kaggle-format, Clouds-like set.

``python -m pipeline.make_demo_data`` writes, under ``data/demo/``:

- ``train.csv`` (``Image_Label,EncodedPixels``, one row per image and class, as in
  Understanding Clouds) and ``train_images/*.jpg``;
- ``test_images/*.jpg``, ``sample_submission.csv`` (every test image x class, ``1 1``);
- ``test_truth.csv``: the hidden truth of the test images, in the train.csv layout, at
  the submission size (masks resized with nearest neighbour);
- ``demo_meta.json``: the parameters, so a second run with the same ones is a no-op.

Each class is a distinct texture (diagonal stripes, round blobs, speckle, fine
horizontal stripes) filling axis-aligned boxes, like the crowd-sourced Clouds labels, on
a cloudless noisy background. Every image comes from its own generator seeded by
``(seed, split, index)``, so an image never depends on how many others are made, and
images are streamed to disk one at a time so the full Clouds-size preset fits in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import cv2
import numpy as np

from pipeline.core.rle import encode_batch
from pipeline.run.cli import setup_logging

logger = logging.getLogger(__name__)

CLASSES = ("Fish", "Flower", "Gravel", "Sugar")
# Bumped whenever the drawing changes, so an old folder is not mistaken for a current one.
GENERATOR_VERSION = 2
META_FILE = "demo_meta.json"
CSV_HEADER = "Image_Label,EncodedPixels\n"
# The size the texture scales below are tuned for; other sizes scale them.
_REFERENCE_SIDE = 160
# Number of classes per image: mean 2.15 of 4, so each class is absent from ~45%.
_N_CLASSES_P = (0.30, 0.35, 0.25, 0.10)
# Relative prevalence (Fish, Flower, Gravel, Sugar), ordered as in the real data.
_CLASS_WEIGHT = (0.25, 0.20, 0.25, 0.30)
# Cloud colour (RGB) of each class where its texture is at full strength: tinted apart
# (cyan, amber, rust, white) so that a small model on 2 CPU cores learns the demo in minutes.
_CLASS_COLOUR = np.array(
    [[140, 215, 255], [255, 210, 120], [210, 130, 110], [245, 245, 245]], dtype=np.float32
)
_GAUSS_QUANTILES = np.array(
    [NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], dtype=np.float32
)
_ID_SPACE = 16**7
_SPLIT_CODE = {"train": 0, "test": 1}
_CLOUDS_PRESET: dict[str, Any] = {
    "n_train": 5546,
    "n_test": 3698,
    "height": 1400,
    "width": 2100,
    "truth_size": (350, 525),
}
_DEFAULTS: dict[str, Any] = {
    "n_train": 300,
    "n_test": 100,
    "height": 160,
    "width": 240,
    "truth_size": (80, 120),
}


def draw_sample(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw one image and its class masks.

    Args:
        rng: the image's own generator (fully determines the result).
        height, width: image size in pixels.

    Returns:
        ``image`` (H, W, 3) uint8 RGB, and one (H, W) uint8 {0, 1} mask per class in
        ``CLASSES`` (all zeros where the class is absent). 1 to 4 classes are present;
        each is the union of 1 or 2 boxes whose sides are 20-70% of the image's.
    """
    scale = max(min(height, width * 2 / 3) / _REFERENCE_SIDE, 0.25)
    # Drawn channel-first: numpy broadcasts over a trailing axis of 3 very slowly.
    planes = _draw_background(rng, height, width, scale)
    n_present = int(rng.choice(len(_N_CLASSES_P), p=_N_CLASSES_P)) + 1
    present = set(rng.choice(len(CLASSES), size=n_present, replace=False, p=_CLASS_WEIGHT))
    masks = {}
    for index, name in enumerate(CLASSES):
        mask = np.zeros((height, width), dtype=np.uint8)
        if index in present:
            n_boxes = 1 + int(rng.random() < 0.25)
            for _ in range(n_boxes):
                y0, y1, x0, x1 = _draw_box(rng, height, width)
                mask[y0:y1, x0:x1] = 1
                # Later classes are painted over earlier ones, but every mask keeps its
                # full box: Clouds classes overlap.
                _paint_cloud(rng, planes[:, y0:y1, x0:x1], index, (y0, x0), scale)
        masks[name] = mask
    planes *= np.float32(rng.uniform(0.85, 1.15))
    # Gaussian pixel noise through a 256-entry quantile table: 4x faster than
    # standard_normal at 1400x2100, and indistinguishable at this amplitude.
    lut = _GAUSS_QUANTILES * np.float32(rng.uniform(3.0, 9.0))
    lut += np.float32(rng.uniform(-12.0, 12.0))
    planes += cv2.LUT(rng.integers(0, 256, (height, width), dtype=np.uint8), lut)
    np.clip(planes, 0, 255, out=planes)
    image = cv2.merge([plane.astype(np.uint8) for plane in planes])
    return image, masks


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

    Returns:
        ``out``.

    Raises:
        ValueError: bad arguments, or ``out`` holds a complete set made with other
            parameters (or a ``train.csv`` not made here) and ``force`` is False.
    """
    out = Path(out)
    meta = _check_arguments(n_train, n_test, height, width, truth_size, seed)
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
    _write_atomically(out / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    # Images left by an earlier generation are only deleted where that generation was
    # ours (a meta file existed), never in a folder of someone else's images.
    remove_stale = saved is not None

    start = time.perf_counter()
    train_ids, test_ids = draw_image_ids(seed, n_train, n_test)
    sizes = (height, width, truth_size)
    options = (remove_stale, workers)
    tmp_train = _write_split(out, "train", train_ids, sizes, seed, options)
    tmp_truth = _write_split(out, "test", test_ids, sizes, seed, options)
    tmp_sample = _write_sample_submission(out, test_ids)
    os.replace(tmp_truth, out / "test_truth.csv")
    os.replace(tmp_sample, out / "sample_submission.csv")
    os.replace(tmp_train, train_csv)
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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m pipeline.make_demo_data [--out data/demo] [--force] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.make_demo_data",
        description="Write the embedded Clouds-like demo data set (Kaggle image_label layout).",
    )
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder")
    parser.add_argument("--n-train", type=int, help="training images (default 300)")
    parser.add_argument("--n-test", type=int, help="test images (default 100)")
    parser.add_argument("--height", type=int, help="image height (default 160)")
    parser.add_argument("--width", type=int, help="image width (default 240)")
    parser.add_argument(
        "--truth-size", type=_parse_size, help="HxW of test_truth.csv masks (default 80x120)"
    )
    parser.add_argument("--seed", type=int, default=12345, help="seed (default %(default)s)")
    parser.add_argument(
        "--clouds-size",
        action="store_true",
        help="benchmark preset: 5546 train + 3698 test images at 1400x2100, truth at "
        "350x525, about 10 GB of JPEGs (options given explicitly still override it)",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes drawing images (default 1; use the core count for --clouds-size)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    preset = _CLOUDS_PRESET if args.clouds_size else _DEFAULTS

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
        )
    except ValueError as error:
        logger.error("%s", error)
        return 2
    except OSError as error:  # e.g. a read-only or special file system under --out
        logger.error("cannot write the demo data to %s: %s", args.out, error)
        return 2
    print(f"demo data in {out}")
    return 0


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


def _draw_background(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Dark, bluish, cloudless sea: smooth low-frequency noise, (3, H, W) float32 RGB planes."""
    smooth = _smooth_noise(rng, height, width, 40.0 * scale)
    smooth -= np.float32(0.5)
    smooth *= np.float32(rng.uniform(15, 35))
    tint = np.array([35, 55, 80], dtype=np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
    return smooth[None] + tint[:, None, None]


def _draw_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """A box ``(y0, y1, x0, x1)`` whose sides are 20-70% of the image's."""
    box_h = max(1, round(height * rng.uniform(0.2, 0.7)))
    box_w = max(1, round(width * rng.uniform(0.2, 0.7)))
    y0 = int(rng.integers(0, height - box_h + 1))
    x0 = int(rng.integers(0, width - box_w + 1))
    return y0, y0 + box_h, x0, x0 + box_w


def _paint_cloud(
    rng: np.random.Generator,
    region: np.ndarray,
    class_index: int,
    origin: tuple[int, int],
    scale: float,
) -> None:
    """Blend class ``class_index``'s texture into ``region`` ((3, h, w) view of the planes)."""
    h, w = region.shape[1:]
    # Image coordinates, so a texture is continuous across overlapping boxes.
    y = np.arange(origin[0], origin[0] + h, dtype=np.float32)[:, None]
    x = np.arange(origin[1], origin[1] + w, dtype=np.float32)[None, :]
    if class_index == 0:
        texture = _stripes(rng, y, x, period=16 * scale, angle_deg=45.0)
    elif class_index == 1:
        texture = _blobs(rng, y, x, period=24 * scale)
    elif class_index == 2:
        texture = _speckle(rng, h, w, cell=12 * scale)
    else:
        texture = _stripes(rng, y, x, period=12 * scale, angle_deg=90.0)
    # Cloud cover varies slowly inside the box, so the texture is not uniformly crisp.
    strength = rng.uniform(0.55, 0.85)
    cover = _smooth_noise(rng, h, w, 30 * scale)
    cover *= np.float32(0.4 * strength)
    cover += np.float32(0.6 * strength)
    alpha = texture
    alpha *= np.float32(0.8)
    alpha += np.float32(0.2)
    alpha *= cover
    colour = _CLASS_COLOUR[class_index] + rng.uniform(-8, 8, 3).astype(np.float32)
    for channel, value in zip(region, colour, strict=True):
        blend = value - channel
        blend *= alpha
        channel += blend


def _stripes(
    rng: np.random.Generator, y: np.ndarray, x: np.ndarray, period: float, angle_deg: float
) -> np.ndarray:
    """Sinusoidal stripes in [0, 1] whose wave vector points at ``angle_deg`` (±10)."""
    angle = np.deg2rad(angle_deg + rng.uniform(-10, 10))
    period = max(period * rng.uniform(0.9, 1.1), 4.0)
    phase = rng.uniform(0, 2 * np.pi)
    k = np.float32(2 * np.pi / period)
    wave = np.sin(k * (x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))) + phase)
    wave *= np.float32(0.5)
    wave += np.float32(0.5)
    return wave.astype(np.float32, copy=False)


def _blobs(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, period: float) -> np.ndarray:
    """Round cells on a square grid, in [0, 1]: the positive lobes of cos(x)cos(y)."""
    period = max(period * rng.uniform(0.9, 1.1), 6.0)
    k = np.float32(2 * np.pi / period)
    phase_y, phase_x = rng.uniform(0, 2 * np.pi, 2)
    lobes = np.cos(k * y + np.float32(phase_y)) * np.cos(k * x + np.float32(phase_x))
    return np.sqrt(np.clip(lobes, 0, 1)).astype(np.float32, copy=False)


def _speckle(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Scattered bright grains about ``cell`` px across, in [0, 1]."""
    grains = _smooth_noise(rng, h, w, max(cell, 4.0))
    return np.clip((grains - 0.5) * 3.0 + 0.5, 0, 1)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Uniform noise on a grid of ``cell``-px cells, bilinearly upsampled to (h, w) float32."""
    grid_h = max(2, int(np.ceil(h / cell)) + 1)
    grid_w = max(2, int(np.ceil(w / cell)) + 1)
    grid = rng.random((grid_h, grid_w), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)


def make_image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that ``draw_sample`` uses for image ``index`` of ``split`` (train/test)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {list(_SPLIT_CODE)}; got {split!r}")
    return np.random.default_rng([seed, _SPLIT_CODE[split], index, 1])


def draw_image_ids(seed: int, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """Image ids of a data set: unique, Clouds-style (7 hex digits + ``.jpg``).

    Returns:
        (train ids, test ids), each in image-index order: image ``index`` of a split is
        drawn by ``draw_sample(make_image_rng(seed, split, index), H, W)``.
    """
    used: set[str] = set()
    ids: dict[str, list[str]] = {"train": [], "test": []}
    for split, count in (("train", n_train), ("test", n_test)):
        for index in range(count):
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], index, 0])
            image_id = f"{int(rng.integers(_ID_SPACE)):07x}.jpg"
            # Collisions are rare (~16% for the 9,244-image preset); redrawing from the
            # image's own stream keeps every other id unchanged.
            while image_id in used:
                image_id = f"{int(rng.integers(_ID_SPACE)):07x}.jpg"
            used.add(image_id)
            ids[split].append(image_id)
    return ids["train"], ids["test"]


@dataclass(frozen=True)
class _SplitJob:
    """What a worker needs to render one split's images (picklable)."""

    seed: int
    split: str
    image_dir: Path
    height: int
    width: int
    mask_size: tuple[int, int] | None


def _write_split(
    out: Path,
    split: str,
    image_ids: list[str],
    sizes: tuple[int, int, tuple[int, int]],
    seed: int,
    options: tuple[bool, int],
) -> Path:
    """Write a split's images and stream its label CSV to a ``.tmp`` file; return that file.

    Rows are in image-id order, classes in ``CLASSES`` order, as in the Kaggle files. The
    train CSV holds image-size masks; the test one (the truth) holds ``truth_size`` masks.
    ``options`` is (remove stale images, number of worker processes).
    """
    height, width, truth_size = sizes
    remove_stale, workers = options
    image_dir = out / f"{split}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    tmp_csv = out / ("train.csv.tmp" if split == "train" else "test_truth.csv.tmp")
    job = _SplitJob(seed, split, image_dir, height, width, truth_size if split == "test" else None)
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
    return tmp_csv


def _render_image(task: tuple[_SplitJob, int, str]) -> str:
    """Draw image ``index`` from its own generator, write its JPEG, return its CSV rows."""
    job, index, image_id = task
    rng = make_image_rng(job.seed, job.split, index)
    image, masks = draw_sample(rng, job.height, job.width)
    _write_jpeg(job.image_dir / image_id, image)
    mask_list = [masks[name] for name in CLASSES]
    if job.mask_size is not None:
        size = (job.mask_size[1], job.mask_size[0])
        mask_list = [cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for m in mask_list]
    rles = encode_batch(mask_list)
    return "".join(f"{image_id}_{name},{rle}\n" for name, rle in zip(CLASSES, rles, strict=True))


def _write_sample_submission(out: Path, test_ids: list[str]) -> Path:
    """Kaggle-style sample submission (every test image x class, ``1 1``) to a ``.tmp``."""
    tmp = out / "sample_submission.csv.tmp"
    rows = [f"{image_id}_{name},1 1\n" for image_id in sorted(test_ids) for name in CLASSES]
    tmp.write_text(CSV_HEADER + "".join(rows))
    return tmp


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image as JPEG quality 95, atomically."""
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    assert ok, "OpenCV failed to encode an in-memory uint8 image"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.tobytes())
    os.replace(tmp, path)


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
) -> dict[str, object]:
    """Validate the parameters and return them as the ``demo_meta.json`` record."""
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
    return {
        "generator_version": GENERATOR_VERSION,
        "n_train": int(n_train),
        "n_test": int(n_test),
        "height": int(height),
        "width": int(width),
        "truth_size": [int(truth_size[0]), int(truth_size[1])],
        "seed": int(seed),
        "classes": list(CLASSES),
    }


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


def _parse_size(text: str) -> tuple[int, int]:
    """Parse ``"HxW"`` (e.g. ``80x120``) for argparse."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected HxW with positive integers, e.g. 80x120; got {text!r}"
        )
    return int(parts[0]), int(parts[1])


if __name__ == "__main__":
    raise SystemExit(main())
