import logging

import numpy as np
import pytest

from pipeline.core.tta import (
    VIEWS,
    apply_view,
    invert_view,
    merge_arrays,
    merge_views,
    orientation_groups,
    parse_view,
    predict_views,
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
    y = apply_view(x, view)
    swapped = parse_view(view).swaps_axes
    assert y.shape == ((2, size[1], size[0], 3) if swapped else x.shape)
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


def test_valid_views_drops_swaps_axes_on_rectangles(caplog: pytest.LogCaptureFixture) -> None:
    names = ["identity", "rot90", "hflip", "transpose", "rot180", "rot270", "shift:0,8"]
    with caplog.at_level(logging.INFO, logger="pipeline.core.tta"):
        assert valid_views(names, 4, 6) == ["identity", "hflip", "rot180", "shift:0,8"]
    assert "rot90 dropped" in caplog.text
    assert valid_views(names, 5, 5) == names
    assert valid_views(names, 4, 6, rotate=True) == names


def test_rotated_views_of_a_rectangle_hand_checked() -> None:
    x = np.arange(6).reshape(1, 2, 3, 1)
    assert apply_view(x, "rot90")[0, :, :, 0].tolist() == [[2, 5], [1, 4], [0, 3]]
    assert apply_view(x, "transpose")[0, :, :, 0].tolist() == [[0, 3], [1, 4], [2, 5]]
    assert apply_view(x, "rot270")[0, :, :, 0].tolist() == [[3, 0], [4, 1], [5, 2]]


def test_orientation_groups_keep_order() -> None:
    names = ["rot90", "identity", "transpose", "hflip", "shift:1,0"]
    assert orientation_groups(names) == [["identity", "hflip", "shift:1,0"], ["rot90", "transpose"]]
    assert orientation_groups(["hflip"]) == [["hflip"]]


def test_stack_views_refuses_mixed_orientations_on_a_rectangle() -> None:
    with pytest.raises(ValueError, match="share one orientation on a 4x6 batch"):
        stack_views(np.zeros((1, 4, 6, 1)), ["identity", "rot90"])
    assert stack_views(np.zeros((1, 4, 6, 1)), ["rot90", "transpose"]).shape == (2, 6, 4, 1)
    assert stack_views(np.zeros((1, 5, 5, 1)), ["identity", "rot90"]).shape == (2, 5, 5, 1)


@pytest.mark.parametrize("how", ["mean", "gmean", "max"])
def test_predict_views_on_a_rectangle_runs_each_orientation_once(how: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((3, 4, 6, 2), dtype=np.float32)
    calls: list[tuple[int, ...]] = []

    def model(stacked: np.ndarray) -> np.ndarray:
        # Per-pixel and equivariant, like a fully convolutional network: outputs x * 2.
        calls.append(stacked.shape)
        return stacked * 2

    got = predict_views(model, x, list(VIEWS) + SHIFTS[:2], how)
    assert calls == [(7 * 3, 4, 6, 2), (3 * 3, 6, 4, 2)]
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, x * 2, rtol=1e-5, atol=1e-6)


def test_predict_views_inverts_a_rotated_rectangle() -> None:
    x = np.zeros((1, 2, 4, 1), dtype=np.float32)

    def top_left(stacked: np.ndarray) -> np.ndarray:
        # Answers 1 at the top-left pixel of whatever it sees.
        out = np.zeros_like(stacked)
        out[:, 0, 0] = 1.0
        return out

    merged = predict_views(top_left, x, ["identity", "rot90"], "mean")
    # rot90's top-left is the input's top-right (counter-clockwise turn).
    assert merged[0, :, :, 0].tolist() == [[0.5, 0, 0, 0.5], [0, 0, 0, 0]]


def test_predict_views_checks_the_output_count() -> None:
    with pytest.raises(ValueError, match="one output per stacked image"):
        predict_views(lambda s: s[:1], np.zeros((2, 4, 4, 1)), ["identity"])


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
