"""A mask shrunk to the model's size stays where its image is (``core.masks.resize_masks``,
and the truth at a reduced submission size, ``core.truth``)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.core.masks import resize_masks
from pipeline.core.rle import encode
from pipeline.core.truth import decode_truth


def centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


@pytest.mark.parametrize("source, target", [(1000, 64), (360, 96), (1400, 350), (256, 64)])
def test_a_shrunk_mask_is_centred_on_the_shrunk_image(source: int, target: int) -> None:
    # Squares at random places and sizes; the image is the mask in grey, resized as the
    # image cache resizes images (INTER_AREA). Each square's edges fall inside blocks, so
    # one square's two centres differ by up to half a pixel either way; on average they
    # agree within half a source pixel. cv2's INTER_NEAREST would move the mask by
    # (s - 1) / (2 s) of a model pixel on average (0.47 at 1000 -> 64, 0.37 at 360 -> 96).
    rng = np.random.default_rng(source + target)
    offsets = []
    for _ in range(60):
        side = int(rng.integers(3, 8) * source / target)
        top, left = (int(v) for v in rng.integers(0, source - side, size=2))
        mask = np.zeros((source, source), np.uint8)
        mask[top : top + side, left : left + side] = 1
        image = cv2.resize(mask.astype(np.float32), (target, target), interpolation=cv2.INTER_AREA)
        shrunk = resize_masks(mask[:, :, None], (target, target))[:, :, 0]
        rows, cols = np.indices(image.shape)
        weight = image.sum()
        offsets.append(centroid(shrunk)[0] - float((rows * image).sum() / weight))
        offsets.append(centroid(shrunk)[1] - float((cols * image).sum() / weight))
    # Nearest picks one source pixel: at an even scale the block's centre falls between two,
    # half a source pixel from either.
    assert abs(float(np.mean(offsets))) <= 0.5 * target / source + 0.05, np.mean(offsets)


def test_the_truth_at_a_reduced_size_is_the_resized_mask() -> None:
    rng = np.random.default_rng(0)
    mask = (rng.random((140, 210)) > 0.7).astype(np.uint8)
    truth = decode_truth([encode(mask)], (140, 210), (35, 52))
    assert np.array_equal(truth[0], resize_masks(mask[:, :, None], (35, 52))[:, :, 0])
