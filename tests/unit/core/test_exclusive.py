"""core.exclusive: argmax decoding, void left out of the Kaggle Dice, the pixel
confusion matrix and the overlap check of RLE masks (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core import rle
from pipeline.core.exclusive import (
    argmax_masks,
    background,
    confusion_matrix,
    exclusive_levels,
    labels,
    mask_labels,
    one_hot,
    overlapping_pair,
    without_void,
)
from pipeline.core.metrics import kaggle_dice
from pipeline.core.postprocess import binarize


def test_argmax_takes_the_background_from_what_the_classes_leave() -> None:
    probs = np.array([[[0.2, 0.3], [0.6, 0.1], [0.1, 0.45], [0.05, 0.05]]], dtype=np.float32)
    np.testing.assert_allclose(background(probs), [[0.5, 0.3, 0.45, 0.9]], atol=1e-6)
    # background 0.5 beats 0.3; class 0 wins; class 1 (0.45) ties the background: background.
    assert labels(probs).tolist() == [[0, 1, 0, 0]]
    masks = argmax_masks(probs)
    assert masks.dtype == np.uint8 and masks.tolist() == [[[0, 0], [1, 0], [0, 0], [0, 0]]]
    assert (argmax_masks(probs).sum(axis=-1) <= 1).all()
    assert mask_labels(masks).tolist() == labels(probs).tolist()
    assert one_hot(np.array([0, 2, 1]), 2).tolist() == [[0, 0], [0, 1], [1, 0]]


def test_void_pixels_never_change_the_kaggle_dice() -> None:
    rng = np.random.default_rng(0)
    truth = one_hot(rng.integers(0, 4, size=(2, 16, 16)), 3)
    probs = rng.dirichlet(np.ones(4), size=(2, 16, 16))[..., 1:].astype(np.float32)
    void = (rng.random((2, 16, 16)) < 0.2).astype(np.uint8)

    def score(t: np.ndarray, p: np.ndarray) -> np.ndarray:
        return kaggle_dice(without_void(t, void), without_void(argmax_masks(p), void), 0.5)

    base = score(truth, probs)
    # Rewrite truth and prediction at the void pixels only: the score must not move.
    other_truth = np.where(void[..., None] == 1, one_hot(np.full((2, 16, 16), 2), 3), truth)
    other_probs = np.where(void[..., None] == 1, np.float32([0.9, 0.05, 0.0]), probs)
    np.testing.assert_array_equal(score(other_truth, other_probs), base)
    # Without the void mask the same rewrite changes it: the check above could fail.
    plain = kaggle_dice(truth, argmax_masks(probs), 0.5)
    changed = kaggle_dice(other_truth, argmax_masks(other_probs), 0.5)
    assert not np.array_equal(plain, changed)


def test_confusion_matrix_counts_labels_without_void() -> None:
    truth = np.array([[0, 1, 2], [2, 2, 0]])
    pred = np.array([[0, 2, 2], [1, 2, 1]])
    void = np.array([[0, 0, 0], [0, 0, 1]])
    matrix = confusion_matrix(truth, pred, 2, void)
    assert matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 2]]
    assert confusion_matrix(truth, pred, 2).sum() == 6
    with pytest.raises(ValueError, match="differ in size"):
        confusion_matrix(truth, pred[:1], 2)


def test_overlapping_pair_finds_classes_sharing_a_pixel() -> None:
    a = np.zeros((8, 8), np.uint8)
    b = np.zeros((8, 8), np.uint8)
    c = np.zeros((8, 8), np.uint8)
    a[0:3, 0:3] = 1
    b[4:6, 4:8] = 1
    c[6:8, 0:8] = 1
    rles = [rle.encode(m) for m in (a, b, c)]
    assert overlapping_pair(rles) is None
    assert overlapping_pair(["", rles[0], ""]) is None
    c[5, 5] = 1  # now class 2 touches class 1
    assert overlapping_pair([rles[0], rles[1], rle.encode(c)]) == (1, 2)
    # A long run of one class covering another's run that starts later.
    assert overlapping_pair(["1 50", "60 5", "10 2"]) == (0, 2)


def test_exclusive_levels_keep_the_argmax_for_every_threshold() -> None:
    q = np.zeros((3, 2, 2), np.uint8)  # (C, H, W) quantised, as the stores hold them
    q[:, 0, 0] = [100, 90, 20]  # background 45/255 of the mass: class 0 wins at 100
    q[:, 0, 1] = [60, 60, 60]  # background 75: it wins
    q[:, 1, 0] = [0, 0, 250]  # class 2
    q[:, 1, 1] = [200, 0, 0]  # class 0, but void
    void = np.array([[0, 0], [0, 1]], np.uint8)
    levels = exclusive_levels(q, void)
    assert levels.dtype == np.uint8 and set(np.unique(levels)) <= {0, 255}
    expected = np.zeros((3, 2, 2), np.uint8)
    expected[0, 0, 0] = expected[2, 1, 0] = 1
    for threshold in (0.05, 0.5, 0.95):
        masks = np.stack([binarize(c, threshold) for c in levels])
        np.testing.assert_array_equal(masks, expected)
    floats = exclusive_levels(q.astype(np.float32) / 255.0)
    assert floats.dtype == np.float32 and floats[0, 1, 1] == 1.0  # no void given


def test_overlapping_pair_agrees_with_the_decoded_masks() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        masks = (rng.random((3, 6, 7)) < rng.random((3, 1, 1)) * 0.5).astype(np.uint8)
        if rng.random() < 0.5:  # make them exclusive half of the time
            label = rng.integers(0, 4, (6, 7))
            masks = one_hot(label, 3).transpose(2, 0, 1)
        pair = overlapping_pair([rle.encode(m) for m in masks])
        shared = [(i, j) for i in range(3) for j in range(i + 1, 3) if (masks[i] & masks[j]).any()]
        if not shared:
            assert pair is None
        else:
            assert pair in shared
