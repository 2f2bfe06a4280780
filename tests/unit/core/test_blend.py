import numpy as np
import pytest

from pipeline.core.blend import blend_levels, one_hot_index, simplex_weights


def test_simplex_weights_cover_the_grid_and_sum_to_one() -> None:
    w = simplex_weights(2, 0.25)
    assert w.tolist() == [[0, 1], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1, 0]]
    three = simplex_weights(3, 0.1)
    assert len(three) == 66  # C(10 + 2, 2)
    np.testing.assert_allclose(three.sum(axis=1), 1.0)
    assert one_hot_index(three, 0) == len(three) - 1 and one_hot_index(three, 2) == 0
    assert simplex_weights(1, 0.5).tolist() == [[1.0]]


@pytest.mark.parametrize(("n", "step", "match"), [(2, 0.3, "must divide 1"), (2, 0, r"in \(0, 1\]"),
                                                   (0, 0.5, "at least one member")])  # fmt: skip
def test_simplex_weights_errors(n: int, step: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        simplex_weights(n, step)


def test_blend_levels_per_class_weights_and_exact_one_hot() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 3, 4), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 3, 4), dtype=np.uint8)
    np.testing.assert_array_equal(blend_levels([a, b], np.array([1.0, 0.0])), a)
    mixed = blend_levels([a, b], np.array([[1.0, 0.0], [0.25, 0.75]]))
    np.testing.assert_array_equal(mixed[0], a[0])
    expected = np.rint(0.25 * a[1].astype(np.float64) + 0.75 * b[1]).astype(np.uint8)
    assert np.abs(mixed[1].astype(int) - expected).max() <= 1  # float32 sum vs float64
    assert mixed.dtype == np.uint8
    half = blend_levels([np.full((1, 1, 1), 255, np.uint8), np.zeros((1, 1, 1), np.uint8)],
                        np.array([0.5, 0.5]))  # fmt: skip
    assert half.item() == 128  # rint(127.5) rounds half to even: 128


def test_blend_levels_errors() -> None:
    a = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(ValueError, match="at least|one array per member"):
        blend_levels([], np.array([]))
    with pytest.raises(ValueError, match="member 1's levels must be uint8"):
        blend_levels([a, a.astype(np.float32)], np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="sum to 1"):
        blend_levels([a, a], np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match=r"weights must be \(2,\) or \(2, 2\)"):
        blend_levels([a, a], np.ones((3, 2)) / 2)
