"""The fold merge of pipeline.predict: fixed-point accumulation against the float merge."""

from __future__ import annotations

import datetime

import numpy as np
import pytest

from pipeline.core.clock import StageClock
from pipeline.core.fold_merge import MERGE_TOLERANCE, FoldAccumulator
from pipeline.core.probstore import quantise_prob
from pipeline.core.tta import merge_arrays
from pipeline.run.prediction import submission_path


def accumulate(tmp_path, folds, how, batch=3):
    """Merge the (N, H, W, C) arrays of ``folds`` through a FoldAccumulator, in batches."""
    n = len(folds[0])
    acc = FoldAccumulator(tmp_path / "merge.npy", folds[0].shape, len(folds), how)
    for probs in folds:
        for start in range(0, n, batch):
            acc.add(start, probs[start : start + batch])
    merged = acc.merged(0, n)
    return acc, merged


@pytest.mark.parametrize("how", ["mean", "gmean", "max"])
@pytest.mark.parametrize("n_folds", [1, 3, 5, 10])
def test_merge_matches_float_merge_within_a_quarter_level(tmp_path, how, n_folds):
    rng = np.random.default_rng(n_folds)
    folds = [rng.random((7, 5, 6, 4), dtype=np.float32) for _ in range(n_folds)]
    # Exact 0 and 1 too, the ends of the range and the gmean floor.
    folds[0][0, 0, 0] = [0.0, 1.0, 0.5, 1e-9]
    acc, merged = accumulate(tmp_path, folds, how)
    expected = merge_arrays(folds, how)
    assert merged.dtype == np.float32 and merged.shape == expected.shape
    assert acc.max_error <= MERGE_TOLERANCE
    assert np.abs(merged - expected).max() <= acc.max_error + 1e-6
    levels = quantise_prob(merged).astype(int) - quantise_prob(expected).astype(int)
    assert np.abs(levels).max() <= 1
    acc.close()
    assert not (tmp_path / "merge.npy").exists()


def test_storage_is_uint16_unless_its_error_would_pass_the_tolerance(tmp_path):
    shape = (1, 2, 2, 1)
    assert FoldAccumulator(tmp_path / "a.npy", shape, 3, "mean").dtype == np.uint16
    assert FoldAccumulator(tmp_path / "b.npy", shape, 3, "gmean").dtype == np.uint16
    # 10 folds of -log(p) up to 16.1 leave 16 bits too coarse: 32 bits are used.
    assert FoldAccumulator(tmp_path / "c.npy", shape, 10, "gmean").dtype == np.uint32


def test_mean_of_two_folds_by_hand(tmp_path):
    # 65535 // 2 = 32767 steps per unit: 0.25 -> 8192 (8191.75 rounded), 1 -> 32767.
    a = np.array([0.0, 0.25, 1.0, 1.0], dtype=np.float32).reshape(1, 1, 4, 1)
    b = np.array([0.0, 0.75, 1.0, 0.0], dtype=np.float32).reshape(1, 1, 4, 1)
    acc, merged = accumulate(tmp_path, [a, b], "mean")
    assert acc.scale == 32767
    np.testing.assert_allclose(merged.ravel(), [0.0, 0.5, 1.0, 0.5], atol=1 / 32767)
    assert merged.max() <= 1.0


def test_sums_never_overflow(tmp_path):
    folds = [np.ones((2, 3, 3, 2), dtype=np.float32) for _ in range(3)]
    for how in ("mean", "gmean", "max"):
        _, merged = accumulate(tmp_path / how, folds, how)
        np.testing.assert_allclose(merged, 1.0, atol=1e-6)
    zeros = [np.zeros((2, 3, 3, 2), dtype=np.float32) for _ in range(3)]
    _, merged = accumulate(tmp_path / "zeros", zeros, "gmean")
    assert merged.max() <= 2e-7  # the GMEAN_EPS floor, as tta.merge_arrays


def test_merging_before_every_fold_is_an_error(tmp_path):
    acc = FoldAccumulator(tmp_path / "m.npy", (4, 2, 2, 1), 2, "mean")
    probs = np.full((4, 2, 2, 1), 0.5, dtype=np.float32)
    acc.add(0, probs)
    with pytest.raises(ValueError, match="image 0 holds 1 of 2 folds"):
        acc.merged(0, 4)
    acc.add(0, probs[:2])
    with pytest.raises(ValueError, match="image 2 holds 1 of 2 folds"):
        acc.merged(0, 4)
    np.testing.assert_allclose(acc.merged(0, 2), 0.5, atol=1e-4)


def test_adding_a_fold_too_many_or_a_bad_shape_is_an_error(tmp_path):
    acc = FoldAccumulator(tmp_path / "m.npy", (2, 2, 2, 1), 1, "max")
    probs = np.zeros((2, 2, 2, 1), dtype=np.float32)
    acc.add(0, probs)
    with pytest.raises(ValueError, match="already hold all 1 folds"):
        acc.add(0, probs)
    with pytest.raises(ValueError, match=r"must be \(B, 2, 2, 1\) within 2 images"):
        acc.add(1, probs)
    with pytest.raises(ValueError, match="how must be one of mean, gmean, max; got 'median'"):
        FoldAccumulator(tmp_path / "x.npy", (2, 2, 2, 1), 1, "median")
    with pytest.raises(ValueError, match="n_folds must be at least 1; got 0"):
        FoldAccumulator(tmp_path / "x.npy", (2, 2, 2, 1), 0, "mean")


def test_submission_name_gets_a_counter_when_taken(tmp_path):
    now = datetime.datetime(2024, 3, 9, 14, 5)
    first = submission_path(tmp_path, "demo", now)
    assert first == tmp_path / "demo_20240309-1405.csv"
    first.write_text("x")
    assert submission_path(tmp_path, "demo", now) == tmp_path / "demo_20240309-1405-2.csv"


def test_stage_clock_sums_repeated_stages():
    clock = StageClock()
    for _ in range(3):
        with clock.stage("network"):
            pass
    with pytest.raises(RuntimeError), clock.stage("write"):
        raise RuntimeError
    assert set(clock.seconds) == {"network", "write"}
    assert all(v >= 0 for v in clock.seconds.values())
