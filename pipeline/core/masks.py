"""Per-image mask stacks from the canonical table: decode, resize, look up (pure layer)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import pandas as pd

from pipeline.core.rle import decode

# How a mask is resized: nearest neighbour at each target pixel's centre. cv2's
# INTER_NEAREST takes the first source pixel of each block instead, (s - 1) / 2 source
# pixels up and left of the centre when shrinking by s: a target shifted by up to half a
# model pixel against the image (whose INTER_AREA or bilinear resize is centred), which
# a network learns and the scores at full size pay for (docs/quality.md).
MASK_INTERPOLATION = cv2.INTER_NEAREST_EXACT


def rles_by_image(table: pd.DataFrame, classes: Sequence[str]) -> dict[str, list[str]]:
    """Map image_id -> RLE strings in ``classes`` order ("" where a class is empty).

    ``table`` is the canonical mask table (``image_id``, ``class_name``, ``rle``).
    """
    order = {name: i for i, name in enumerate(classes)}
    unknown = set(table["class_name"]) - set(order)
    if unknown:
        raise ValueError(f"mask table has classes {sorted(unknown)} not in classes {list(classes)}")
    out: dict[str, list[str]] = {}
    for image_id, class_name, rle in table[["image_id", "class_name", "rle"]].itertuples(
        index=False
    ):
        row = out.setdefault(image_id, [""] * len(classes))
        row[order[class_name]] = "" if pd.isna(rle) else str(rle)
    return out


def decode_masks(rles: Sequence[str], shape: tuple[int, int]) -> np.ndarray:
    """Decode one image's per-class RLEs into a (H, W, C) uint8 {0, 1} stack."""
    out = np.zeros((*shape, len(rles)), dtype=np.uint8)
    for c, rle in enumerate(rles):
        if rle:
            out[:, :, c] = decode(rle, shape)
    return out


def resize_masks(masks: np.ndarray, size: Sequence[int] | None) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W, C) uint8 stack to ``size`` [H, W] (None: as is),
    sampling each target pixel's centre (``MASK_INTERPOLATION``)."""
    if size is None or tuple(masks.shape[:2]) == tuple(size):
        return masks
    height, width = int(size[0]), int(size[1])
    channels = [
        cv2.resize(masks[:, :, c], (width, height), interpolation=MASK_INTERPOLATION)
        for c in range(masks.shape[2])
    ]
    return np.stack(channels, axis=-1)


def resize_probs(probs: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a (H, W, C) float32 probability stack to ``size`` [H, W]."""
    height, width = int(size[0]), int(size[1])
    if tuple(probs.shape[:2]) == (height, width):
        return probs
    out = cv2.resize(probs, (width, height), interpolation=cv2.INTER_LINEAR)
    return out.reshape(height, width, probs.shape[2])


def truth_masks(
    rles: Sequence[str], original_shape: tuple[int, int], size: Sequence[int] | None
) -> np.ndarray:
    """Truth (H, W, C) uint8 at ``size`` (the submission size; None = the original size)."""
    return resize_masks(decode_masks(rles, original_shape), size)
