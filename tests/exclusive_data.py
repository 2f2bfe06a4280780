"""A generated index-coded data set of mutually exclusive classes, for the softmax tests
and ``benchmarks/bench_softmax.py``.

Like the demo data (``make_demo_data``), every image is drawn from ``(seed, split,
index)``: a noisy background with a few discs and boxes, each of one class, drawn in
turn so a later shape covers an earlier one (one class per pixel). Each class has its
own colour, so a small network learns them in an epoch or two. The mask is a PNG whose
pixel value is the class id (1..C, 0 background) with a ring of ``VOID`` pixels round
every shape (the VOC convention for uncertain borders).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

VOID = 255
CLASS_COLOURS = (
    (220, 40, 40),
    (40, 200, 60),
    (50, 80, 230),
    (230, 210, 40),
    (200, 60, 220),
    (40, 210, 220),
)


def class_names(n_classes: int) -> list[str]:
    return [f"c{k}" for k in range(1, n_classes + 1)]


def draw_indexed(
    rng: np.random.Generator, height: int, width: int, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, mask (H, W) uint8: class id, 0 background, VOID)."""
    y, x = np.mgrid[0:height, 0:width]
    image = rng.normal(110, 18, size=(height, width, 3))
    mask = np.zeros((height, width), dtype=np.uint8)
    ring = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.integers(1, n_classes + 1))
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = int(rng.integers(max(3, height // 10), max(4, height // 4)))
        if rng.random() < 0.5:
            dist = np.hypot(y - cy, x - cx) / r
        else:
            dist = np.maximum(np.abs(y - cy), np.abs(x - cx)) / r
        inside = dist <= 1.0
        border = (dist > 1.0) & (dist <= 1.0 + 1.5 / r)
        image[inside] = np.asarray(CLASS_COLOURS[label - 1]) + rng.normal(0, 12, (inside.sum(), 3))
        mask[inside] = label
        ring[inside] = False
        ring |= border
    mask[ring] = VOID
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_indexed_data(
    out: Path,
    n_train: int = 16,
    n_test: int = 4,
    height: int = 64,
    width: int = 64,
    n_classes: int = 5,
    seed: int = 3,
) -> Path:
    """``out/train_images/*.png``, ``out/masks/*.png`` (index-coded, ``VOID`` void),
    ``out/test_images/*.png``, ``out/test_masks/*.png`` and ``out/sample_submission.csv``
    (``image_label``: one row per test image and class)."""
    if not 1 <= n_classes <= len(CLASS_COLOURS):
        raise ValueError(f"n_classes must be 1..{len(CLASS_COLOURS)}; got {n_classes}")
    for name in ("train_images", "masks", "test_images", "test_masks"):
        (out / name).mkdir(parents=True, exist_ok=True)
    for split, n, images, masks in (
        ("train", n_train, "train_images", "masks"),
        ("test", n_test, "test_images", "test_masks"),
    ):
        for i in range(n):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
            image, mask = draw_indexed(rng, height, width, n_classes)
            image_id = f"{split}{i:03d}"
            Image.fromarray(image).save(out / images / f"{image_id}.png")
            Image.fromarray(mask, mode="L").save(out / masks / f"{image_id}.png")
    rows = [
        f"test{i:03d}.png_{name},1 1\n" for i in range(n_test) for name in class_names(n_classes)
    ]
    (out / "sample_submission.csv").write_text("Image_Label,EncodedPixels\n" + "".join(rows))
    return out


def indexed_data_section(data: Path, n_classes: int = 5) -> dict[str, object]:
    """The ``data`` config section reading ``make_indexed_data``'s set as indexed masks."""
    return {
        "demo": False,
        "train_csv": None,
        "masks": str(data / "masks"),
        "mask_format": "indexed",
        "class_map": {name: k for k, name in enumerate(class_names(n_classes), start=1)},
        "classes": class_names(n_classes),
        "ignore_index": VOID,
        "train_images": str(data / "train_images"),
        "test_images": str(data / "test_images"),
        "sample_submission": str(data / "sample_submission.csv"),
        "test_truth": None,
    }
