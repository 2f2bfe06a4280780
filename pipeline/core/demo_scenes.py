"""Procedural street scenes: the demo's multi-class, photograph-like variant (pure numpy/cv2).

``make_demo_data --variant scenes`` draws these instead of the cloud boxes. Each image
is a street seen from a car, at 360x480 by default (not the training size, nor its
aspect ratio), with four labelled classes:

- ``Road`` and ``Building``: large and frequent (in more than 90% of the images), and
  never overlapping: a building is cut where the road or a nearer object covers it;
- ``Car`` and ``Pedestrian``: small and sparse (about half and a third of the images).

The unlabelled rest (sky, pavements, trees, poles) shares their colours: grey pavement
beside grey asphalt, beige and grey facades under a grey sky. Colours follow natural
photographs: a per-image white balance and exposure, a light gradient, soft shadows
across the road, sensor noise, a slight blur and JPEG compression (by the writer). The
masks are the final visible regions of each class (later objects occlude earlier ones).
"""

from __future__ import annotations

import cv2
import numpy as np

SCENE_CLASSES = ("Road", "Building", "Car", "Pedestrian")
FREQUENT_CLASSES = ("Road", "Building")
SCENE_DEFAULTS = {"height": 360, "width": 480}

_FACADES = np.array(
    [[196, 180, 150], [150, 140, 128], [120, 90, 70], [170, 160, 155], [110, 110, 115],
     [205, 195, 175], [140, 100, 80], [90, 95, 100]], dtype=np.float32
)  # fmt: skip
_CARS = np.array(
    [[180, 30, 30], [30, 50, 120], [220, 220, 215], [30, 30, 30], [140, 140, 145],
     [200, 170, 40], [60, 90, 60], [110, 20, 25]], dtype=np.float32
)  # fmt: skip
_CLOTHES = np.array(
    [[40, 40, 60], [150, 30, 30], [200, 190, 170], [30, 30, 30], [60, 90, 140], [90, 70, 50]],
    dtype=np.float32,
)


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in [-1, 1] with features of about ``cell`` pixels."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    small = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(-1, 1)


def _fill(canvas: np.ndarray, region: np.ndarray, colour: np.ndarray, texture: np.ndarray) -> None:
    """Paint ``colour`` modulated by ``texture`` (H, W) where ``region`` (bool)."""
    canvas[region] = colour[None, :] * (1.0 + texture[region][:, None])


def draw_scene(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One street scene: RGB uint8 (H, W, 3) and a {class: (H, W) uint8 0/1} mask per class."""
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.zeros((h, w, 3), np.float32)
    label = np.zeros((h, w), np.int8)  # 0 unlabelled, 1.. SCENE_CLASSES order
    horizon = rng.uniform(0.35, 0.55) * h
    vanish = rng.uniform(0.3, 0.7) * w

    # Sky: a vertical gradient, blue or overcast, with soft clouds.
    overcast = rng.random() < 0.5
    top = np.array([200, 205, 210] if overcast else [70, 120, 200], np.float32)
    low = np.array([225, 225, 228] if overcast else [170, 200, 235], np.float32)
    t = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]
    image[:] = top * (1 - t) + low * t
    image += 25 * _noise(rng, h, w, 60)[..., None]

    # Buildings along the horizon, some up to the top of the image (no sky there).
    x = -rng.uniform(0, 60)
    while x < w:
        bw = rng.uniform(0.12, 0.45) * w
        reach = rng.uniform(0.0, horizon * 1.1) if rng.random() < 0.85 else horizon + 10
        top_y = max(0.0, horizon - reach) if rng.random() > 0.25 else 0.0
        base_y = horizon + rng.uniform(0.02, 0.12) * h
        region = (xx >= x) & (xx < x + bw) & (yy >= top_y) & (yy < base_y)
        colour = _FACADES[rng.integers(len(_FACADES))] * rng.uniform(0.8, 1.15)
        texture = 0.08 * _noise(rng, h, w, 8)
        # Windows: a dark grid.
        pitch_x, pitch_y = rng.uniform(14, 30), rng.uniform(16, 34)
        windows = ((xx - x) % pitch_x < pitch_x * 0.45) & ((yy - top_y) % pitch_y < pitch_y * 0.5)
        texture = texture - 0.45 * windows * (rng.random() < 0.85)
        _fill(image, region, colour, texture)
        label[region] = 2
        x += bw + rng.uniform(0, 0.08) * w * (rng.random() < 0.3)

    # Trees (unlabelled): green blobs in front of some facades.
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(0, w), horizon - rng.uniform(0, 0.25) * h
        r = rng.uniform(0.05, 0.14) * h
        blob = ((xx - cx) / (1.3 * r)) ** 2 + ((yy - cy) / r) ** 2 + 0.5 * _noise(rng, h, w, 12)
        region = blob < 1.0
        colour = np.array([60, 95, 45], np.float32) * rng.uniform(0.7, 1.3)
        _fill(image, region, colour, 0.25 * _noise(rng, h, w, 4))
        label[region] = 0

    # The ground: pavement (unlabelled) then the road, a trapezoid from the vanishing point.
    ground = yy >= horizon + 0.02 * h
    pavement = np.array([150, 145, 135], np.float32) * rng.uniform(0.75, 1.15)
    _fill(image, ground, pavement, 0.1 * _noise(rng, h, w, 6))
    label[ground] = 0
    spread_l, spread_r = rng.uniform(0.6, 1.6), rng.uniform(0.6, 1.6)
    depth = np.maximum(yy - horizon, 0)
    road = ground & (xx > vanish - spread_l * depth) & (xx < vanish + spread_r * depth)
    asphalt = np.array([95, 95, 100], np.float32) * rng.uniform(0.7, 1.35)
    _fill(image, road, asphalt, 0.12 * _noise(rng, h, w, 5) + 0.1 * _noise(rng, h, w, 50))
    # Dashed lane markings are road.
    lane = road & (np.abs(xx - vanish) < 0.02 * depth + 1) & ((depth**0.5 * 3) % 4 < 2)
    image[lane] = np.array([230, 230, 220], np.float32) * rng.uniform(0.8, 1.0)
    label[road] = 1

    # Cars on the road, nearer ones larger; pedestrians on the pavement.
    if rng.random() < 0.55:
        for _ in range(rng.integers(1, 4)):
            base = horizon + rng.uniform(0.08, 0.55) * (h - horizon)
            scale = (base - horizon) / (h - horizon)
            cw, ch = (0.1 + 0.35 * scale) * w * rng.uniform(0.7, 1.1), 0.0
            ch = cw * rng.uniform(0.45, 0.7)
            cx = vanish + rng.uniform(-0.8, 0.8) * (base - horizon)
            body = (np.abs(xx - cx) < cw / 2) & (yy > base - ch) & (yy < base)
            cabin = (np.abs(xx - cx) < cw * 0.32) & (yy > base - ch * 1.45) & (yy <= base - ch)
            car = body | cabin
            colour = _CARS[rng.integers(len(_CARS))] * rng.uniform(0.8, 1.1)
            _fill(image, car, colour, 0.06 * _noise(rng, h, w, 6))
            glass = cabin & (np.abs(xx - cx) < cw * 0.28) & (yy > base - ch * 1.38)
            image[glass] = np.array([40, 50, 60], np.float32)
            label[car] = 3
    if rng.random() < 0.35:
        for _ in range(rng.integers(1, 4)):
            base = horizon + rng.uniform(0.1, 0.7) * (h - horizon)
            height_p = (0.08 + 0.4 * (base - horizon) / (h - horizon)) * h
            side = -1 if rng.random() < 0.5 else 1
            cx = vanish + side * (rng.uniform(1.0, 1.6) * (base - horizon) + 5)
            person = ((xx - cx) / (0.14 * height_p)) ** 2 + (
                (yy - (base - height_p / 2)) / (height_p / 2)
            ) ** 2 < 1.0
            colour = _CLOTHES[rng.integers(len(_CLOTHES))] * rng.uniform(0.8, 1.2)
            _fill(image, person, colour, 0.08 * _noise(rng, h, w, 4))
            label[person] = 4

    # Soft shadows across the ground, a light gradient, white balance and exposure.
    shadow = (_noise(rng, h, w, 70) > rng.uniform(0.2, 0.6)) & ground
    image[shadow] *= rng.uniform(0.45, 0.75)
    light = 1.0 + rng.uniform(-0.25, 0.25) * (xx / w - 0.5) + rng.uniform(-0.2, 0.1) * (yy / h)
    image *= light[..., None]
    image *= rng.uniform(0.85, 1.15, 3)[None, None, :] * rng.uniform(0.55, 1.35)
    image = 255.0 * np.clip(image / 255.0, 0, 1) ** rng.uniform(0.8, 1.25)
    image += rng.normal(0, rng.uniform(2, 8), image.shape)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.2))
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    masks = {name: (label == k + 1).astype(np.uint8) for k, name in enumerate(SCENE_CLASSES)}
    return rgb, masks
