import logging

import numpy as np
import pytest

from pipeline.core.tta import (
    VIEWS,
    apply_view,
    invert_view,
    merge_arrays,
    merge_views,
    parse_view,
    stack_views,
    valid_views,
)

SHIFTS = ["shift:0,8", "shift:3,-2", "shift:-7,0", "shift:40,41"]


def _batch(h: int, w: int, n: int = 2, c: int = 3) -> np.ndarray:
    return np.arange(n * h * w * c, dtype=np.int64).reshape(n, h, w, c)


@pytest.mark.parametrize("size", [(5, 5), (6, 6), (5, 8), (6, 7), (1, 4)])
@pytest.mark.parametrize("view", list(VIEWS) + SHIFTS)
def test_inverse_restores_input_exactly(size: tuple[int, int], view: str) -> None:
    x = _batch(*size)
    if parse_view(view).square_only and size[0] != size[1]:
        with pytest.raises(ValueError, match="needs square inputs"):
            apply_view(x, view)
        return
    y = apply_view(x, view)
    assert y.shape == x.shape
    np.testing.assert_array_equal(invert_view(y, view), x)


@pytest.mark.parametrize("view", [v for v in VIEWS if v != "identity"] + SHIFTS[:2])
def test_views_actually_move_pixels(view: str) -> None:
    x = _batch(6, 6)
    assert not np.array_equal(apply_view(x, view), x)


def test_views_hand_checked() -> None:
    x = np.array([[1, 2], [3, 4]]).reshape(1, 2, 2, 1)

    def flat(view: str) -> list[list[int]]:
        return apply_view(x, view)[0, :, :, 0].tolist()

    assert flat("hflip") == [[2, 1], [4, 3]]
    assert flat("vflip") == [[3, 4], [1, 2]]
    assert flat("hvflip") == [[4, 3], [2, 1]]
    assert flat("rot90") == [[2, 4], [1, 3]]
    assert flat("rot180") == [[4, 3], [2, 1]]
    assert flat("rot270") == [[3, 1], [4, 2]]
    assert flat("transpose") == [[1, 3], [2, 4]]
    assert flat("shift:0,1") == [[2, 1], [4, 3]]
    assert flat("shift:1,0") == [[3, 4], [1, 2]]


def test_shift_moves_content_down_right() -> None:
    x = np.zeros((1, 4, 5, 1))
    x[0, 1, 1, 0] = 1
    y = apply_view(x, "shift:2,3")
    assert y[0, 3, 4, 0] == 1 and y.sum() == 1


@pytest.mark.parametrize("name", ["flip", "rot45", "shift:1", "shift:a,b", "shift: 1,2", ""])
def test_invalid_view_errors(name: str) -> None:
    with pytest.raises(ValueError, match="view must be one of identity, hflip"):
        parse_view(name)


def test_batch_must_be_4d() -> None:
    with pytest.raises(ValueError, match=r"batch must be \(N, H, W, C\)"):
        apply_view(np.zeros((4, 4, 1)), "hflip")


def test_valid_views_drops_square_only_on_rectangles(caplog: pytest.LogCaptureFixture) -> None:
    names = ["identity", "rot90", "hflip", "transpose", "rot180", "rot270", "shift:0,8"]
    with caplog.at_level(logging.INFO, logger="pipeline.core.tta"):
        assert valid_views(names, 4, 6) == ["identity", "hflip", "rot180", "shift:0,8"]
    assert "rot90 dropped" in caplog.text
    assert valid_views(names, 5, 5) == names


def test_valid_views_errors() -> None:
    with pytest.raises(ValueError, match="view must be one of"):
        valid_views(["identity", "spin"], 4, 4)
    with pytest.raises(ValueError, match="must not repeat; got 'hflip' twice"):
        valid_views(["hflip", "hflip"], 4, 4)
    with pytest.raises(ValueError, match="at least one view for 4x6"):
        valid_views(["rot90"], 4, 6)


@pytest.mark.parametrize("how", ["mean", "gmean", "max"])
@pytest.mark.parametrize("size", [(6, 6), (5, 7)])
def test_stack_then_merge_of_identity_model_returns_input(how: str, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, *size, 2), dtype=np.float32)
    views = valid_views(list(VIEWS) + SHIFTS, *size)
    stacked = stack_views(x, views)
    assert stacked.shape == (len(views) * 3, *size, 2)
    np.testing.assert_array_equal(stacked[3:6], apply_view(x, views[1]))
    merged = merge_views(stacked, views, 3, how)
    assert merged.dtype == np.float32 and merged.shape == x.shape
    np.testing.assert_allclose(merged, x, rtol=1e-5, atol=1e-6)


def test_merge_views_undoes_each_view_before_merging() -> None:
    x = np.zeros((1, 2, 2, 1), dtype=np.float32)
    x[0, 0, 0, 0] = 1.0
    # A "model" that answers 1 at the top-left pixel of whatever it sees.
    preds = np.zeros((2, 2, 2, 1), dtype=np.float32)
    preds[:, 0, 0, 0] = 1.0
    merged = merge_views(preds, ["identity", "hflip"], 1, "mean")
    assert merged[0, :, :, 0].tolist() == [[0.5, 0.5], [0.0, 0.0]]


def test_merges_hand_checked() -> None:
    a = np.array([0.2, 0.0, 1.0], dtype=np.float32)
    b = np.array([0.8, 0.5, 1.0], dtype=np.float32)
    np.testing.assert_allclose(merge_arrays([a, b], "mean"), [0.5, 0.25, 1.0])
    np.testing.assert_allclose(merge_arrays([a, b], "max"), [0.8, 0.5, 1.0])
    np.testing.assert_allclose(
        merge_arrays([a, b], "gmean"), [0.4, np.sqrt(0.5e-7), 1.0], rtol=1e-5
    )
    assert merge_arrays([a, b]).dtype == np.float32


def test_merge_does_not_modify_inputs() -> None:
    a = np.array([0.2, 0.4], dtype=np.float32)
    before = a.copy()
    for how in ("mean", "gmean", "max"):
        merge_arrays([a, a + 0.1], how)
    np.testing.assert_array_equal(a, before)


def test_merge_errors() -> None:
    a = np.zeros((1, 2, 2, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="how must be one of mean, gmean, max; got 'median'"):
        merge_arrays([a], "median")
    with pytest.raises(ValueError, match="at least one array"):
        merge_arrays([], "mean")
    with pytest.raises(ValueError, match=r"arrays\[1\] must have shape \(1, 2, 2, 1\)"):
        merge_arrays([a, np.zeros((1, 2, 3, 1))], "mean")
    with pytest.raises(ValueError, match=r"preds must be \(len\(views\) \* n, H, W, C\) = \(4"):
        merge_views(np.zeros((3, 2, 2, 1)), ["identity", "hflip"], 2)
    with pytest.raises(ValueError, match="at least one view"):
        stack_views(a, [])
