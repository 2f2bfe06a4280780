"""The pseudo-label rule (Severstal 1st place): a class is kept where the mask and the
presence probability agree confidently; the stacked training source of the next round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.pseudo_label import select
from pipeline.run.image_cache import ImageCache, stack_caches


def test_select_keeps_only_confident_agreement() -> None:
    masks = np.zeros((4, 2, 2), np.uint8)
    masks[0, 0, 0] = masks[1, 0, 0] = 1
    presence = np.array([0.99, 0.5, 0.01, 0.5])
    # 0: mask and p > 0.95 -> present; 1: mask but p unsure -> -1;
    # 2: empty and p < 0.05 -> absent; 3: empty but p unsure -> -1.
    assert select(masks, presence, 0.95, 0.05).tolist() == [1, -1, 0, -1]
    # A mask the classifier calls absent, or a confident class with no mask: not kept.
    assert select(masks[:1], np.array([0.01]), 0.95, 0.05).tolist() == [-1]
    assert select(masks[2:3], np.array([0.99]), 0.95, 0.05).tolist() == [-1]


def _cache(n: int, value: int, name: str) -> ImageCache:
    images = np.full((n, 4, 4, 3), value, np.uint8)
    masks = np.full((n, 4, 4, 2), value % 2, np.uint8)
    sizes = np.full((n, 2), 4)
    return ImageCache(Path(name), [f"{name}{i}" for i in range(n)], sizes, images, masks)


def test_stacked_caches_read_the_second_after_the_first() -> None:
    stacked = stack_caches(_cache(3, 10, "train"), _cache(2, 21, "pseudo"))
    assert stacked.images.shape == (5, 4, 4, 3) and len(stacked.image_ids) == 5
    assert stacked.images[2][0, 0, 0] == 10 and stacked.images[3][0, 0, 0] == 21
    assert stacked.masks is not None and stacked.masks[4][0, 0, 0] == 1
    with pytest.raises(IndexError):
        stacked.images[5]
    small = ImageCache(Path("x"), ["x"], np.ones((1, 2)), np.zeros((1, 2, 2, 3), np.uint8), None)
    with pytest.raises(ValueError, match="different sizes"):
        stack_caches(_cache(1, 0, "a"), small)
