"""The demo data's synthetic images: Clouds-like textured boxes on a noisy sea. Pure.

Each class is a distinct texture (diagonal stripes, round blobs, speckle, fine
horizontal stripes) filling axis-aligned boxes, like the crowd-sourced Clouds labels, on
a cloudless noisy background. ``draw_sample`` draws one image and its class masks from
the image's own generator, ``make_image_rng(seed, split, index)``, so an image never
depends on how many others are made; ``draw_image_ids`` names a set's images. The files
are written by ``pipeline.make_demo_data``.
"""

from __future__ import annotations

from statistics import NormalDist

import cv2
import numpy as np

CLASSES = ("Fish", "Flower", "Gravel", "Sugar")
# Bumped whenever the drawing changes, so an old folder is not mistaken for a current one.
GENERATOR_VERSION = 2
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
