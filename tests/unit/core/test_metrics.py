"""Hand-computed cases for the pure metric formulas (3x3 masks, like segmentation_models)."""

import math

import numpy as np
import pytest

from pipeline.core import metrics, postprocess

TRUTH = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=np.uint8)  # 3 pixels
PRED = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=np.uint8)  # 4 pixels, 2 shared
EMPTY = np.zeros((3, 3), dtype=np.uint8)


def batch(*masks: np.ndarray) -> np.ndarray:
    """Stack (H, W) masks into a (1, H, W, C) batch, one channel per mask."""
    return np.stack(masks, axis=-1)[np.newaxis]


def test_dice_hand_computed() -> None:
    assert metrics.dice(TRUTH, PRED) == pytest.approx(2 * 2 / (3 + 4))
    assert metrics.dice(TRUTH, PRED, smooth=1.0) == pytest.approx((2 * 2 + 1) / (3 + 4 + 1))


def test_iou_hand_computed() -> None:
    assert metrics.iou(TRUTH, PRED) == pytest.approx(2 / 5)
    assert metrics.iou(TRUTH, TRUTH) == 1.0


def test_dice_and_iou_empty_on_empty_is_one() -> None:
    assert metrics.dice(EMPTY, EMPTY) == 1.0
    assert metrics.iou(EMPTY, EMPTY) == 1.0
    assert metrics.dice(TRUTH, EMPTY) == 0.0


def test_dice_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"same shape; got \(3, 3\) and \(3, 2\)"):
        metrics.dice(TRUTH, PRED[:, :2])


def test_soft_dice_hand_computed() -> None:
    prob = np.array([[0.5, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    # sum(t*p) = 1.5, sum(t) = 3, sum(p) = 2
    assert metrics.soft_dice(TRUTH, prob) == pytest.approx((2 * 1.5 + 1) / (3 + 2 + 1))
    assert metrics.soft_dice(TRUTH, prob, smooth=0.0) == pytest.approx(3 / 5)
    assert metrics.soft_dice(EMPTY, np.zeros((3, 3))) == 1.0


def test_kaggle_dice_per_image_and_class() -> None:
    truth = batch(TRUTH, EMPTY, EMPTY, TRUTH)
    prob = batch(PRED * 0.9, EMPTY * 0.9, PRED * 0.9, EMPTY * 0.9)
    scores = metrics.kaggle_dice(truth, prob)
    assert scores.shape == (1, 4)
    assert scores.dtype == np.float64
    # overlap, empty on empty, prediction on empty truth, empty on non-empty truth
    np.testing.assert_allclose(scores[0], [4 / 7, 1.0, 0.0, 0.0])
    assert metrics.kaggle_dice_mean(truth, prob) == pytest.approx((4 / 7 + 1.0) / 4)


def test_kaggle_dice_threshold_is_at_or_above() -> None:
    # The one rule of the pipeline (metrics.above_threshold), as postprocess.binarize.
    prob = batch(TRUTH * 0.5)
    assert metrics.kaggle_dice(batch(TRUTH), prob, threshold=0.5)[0, 0] == 1.0
    assert metrics.kaggle_dice(batch(TRUTH), prob, threshold=0.51)[0, 0] == 0.0
    on = postprocess.binarize(prob[0, :, :, 0], 0.5)
    np.testing.assert_array_equal(on, metrics.above_threshold(prob[0, :, :, 0], 0.5))


def test_kaggle_dice_min_area_empties_small_masks() -> None:
    prob = batch(PRED.astype(np.float32))  # 4 predicted pixels
    truth = batch(EMPTY)
    assert metrics.kaggle_dice(truth, prob, min_area=4)[0, 0] == 0.0  # area 4 is kept
    assert metrics.kaggle_dice(truth, prob, min_area=5)[0, 0] == 1.0  # emptied: 1 on empty
    assert metrics.kaggle_dice(batch(TRUTH), prob, min_area=5)[0, 0] == 0.0


def test_kaggle_dice_rejects_non_batch_and_negative_min_area() -> None:
    with pytest.raises(ValueError, match=r"prob must be a \(N, H, W, C\) batch; got shape"):
        metrics.kaggle_dice(TRUTH, PRED)
    with pytest.raises(ValueError, match="min_area must be >= 0; got -1"):
        metrics.kaggle_dice(batch(TRUTH), batch(PRED), min_area=-1)


def test_presence_accuracy_hand_computed() -> None:
    truth = batch(TRUTH, EMPTY, EMPTY, TRUTH)
    prob = batch(PRED * 0.9, EMPTY * 0.9, PRED * 0.9, EMPTY * 0.9)
    # right, right, false positive, false negative
    assert metrics.presence_accuracy(truth, prob) == 0.5


def test_presence_accuracy_min_area_removes_false_positives() -> None:
    truth = batch(EMPTY, TRUTH)
    prob = batch(PRED * 0.9, PRED * 0.9)  # 4 pixels each
    assert metrics.presence_accuracy(truth, prob) == 0.5
    assert metrics.presence_accuracy(truth, prob, min_area=5) == 0.5  # fp fixed, tp lost
    assert metrics.presence_accuracy(truth[..., :1], prob[..., :1], min_area=5) == 1.0


def test_presence_confusion_counts_and_rates() -> None:
    truth = np.array([[True, True], [False, False], [True, False]])
    pred = np.array([[True, False], [True, False], [True, False]])
    result = metrics.presence_confusion(truth, pred)
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (2, 1, 1, 2)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["specificity"] == pytest.approx(2 / 3)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(4 / 6)


def test_presence_confusion_undefined_rates_are_nan() -> None:
    result = metrics.presence_confusion(np.zeros(3, bool), np.zeros(3, bool))
    assert result["tn"] == 3 and result["accuracy"] == 1.0
    assert math.isnan(result["sensitivity"])
    assert math.isnan(result["precision"])
    assert math.isnan(result["f1"])


def test_topk_mean_score_hand_computed() -> None:
    prob = np.arange(9, dtype=np.float32).reshape(3, 3, 1) / 10  # 0.0 .. 0.8
    np.testing.assert_allclose(metrics.topk_mean_score(prob, k=2), [0.75])
    np.testing.assert_allclose(metrics.topk_mean_score(prob, k=9), [0.4])
    # 0.25 of 9 pixels rounds up to 3: (0.8 + 0.7 + 0.6) / 3
    np.testing.assert_allclose(metrics.topk_mean_score(prob, fraction=0.25), [0.7])


def test_topk_mean_score_batch_matches_per_image_sort() -> None:
    rng = np.random.default_rng(0)
    prob = rng.random((5, 4, 6, 3)).astype(np.float32)
    scores = metrics.topk_mean_score(prob, k=7)
    expected = np.sort(prob.reshape(5, 24, 3), axis=1)[:, -7:, :].mean(axis=1)
    assert scores.shape == (5, 3)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_topk_mean_score_fraction_does_not_round_up_float_noise() -> None:
    prob = np.arange(100, dtype=np.float64).reshape(10, 10, 1)
    np.testing.assert_allclose(metrics.topk_mean_score(prob, fraction=0.01), [99.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of k and fraction"),
        ({"k": 1, "fraction": 0.5}, "exactly one of k and fraction"),
        ({"k": 10}, r"k must be in \[1, 9\] \(H\*W\); got 10"),
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\]; got 0.0"),
    ],
)
def test_topk_mean_score_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.topk_mean_score(np.zeros((3, 3, 1)), **kwargs)
