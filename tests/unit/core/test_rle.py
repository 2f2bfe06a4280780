"""Kaggle RLE: hand-computed cases, round trips and every malformed input."""

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.core import rle, rle_check


def encode_by_pixel_walk(mask: np.ndarray) -> str:
    """Reference encoder: walk the pixels in Kaggle order one by one."""
    height, width = mask.shape
    runs: list[int] = []
    previous = False
    for col in range(width):
        for row in range(height):
            on = bool(mask[row, col])
            number = col * height + row + 1
            if on and not previous:
                runs += [number, 0]
            if on:
                runs[-1] += 1
            previous = on
    return " ".join(map(str, runs))


masks = st.tuples(st.integers(1, 9), st.integers(1, 9)).flatmap(
    lambda shape: st.one_of(
        hnp.arrays(np.bool_, shape),
        hnp.arrays(np.uint8, shape, elements=st.sampled_from([0, 1, 255])),
        hnp.arrays(np.int64, shape, elements=st.integers(-2, 2)),
    )
)


def test_decode_kaggle_example_column_major() -> None:
    mask = rle.decode("1 3 10 5", (4, 4))
    # Pixels 1-3 are rows 0-2 of column 0; pixels 10-14 are rows 1-3 of column 2 and
    # rows 0-1 of column 3 (pixel number = col * 4 + row + 1).
    expected = np.array(
        [
            [1, 0, 0, 1],
            [1, 0, 1, 1],
            [1, 0, 1, 0],
            [0, 0, 1, 0],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(mask, expected)
    assert mask.dtype == np.uint8
    assert mask.flags.c_contiguous


def test_decode_non_square_shape() -> None:
    # (2, 3): pixel 3 is (row 0, col 1), pixel 6 is (row 1, col 2).
    mask = rle.decode("3 1 6 1", (2, 3))
    np.testing.assert_array_equal(mask, [[0, 1, 0], [0, 0, 1]])
    # Shapes taken from image.shape hold numpy integers.
    shape = np.zeros((2, 3)).shape[:2]
    np.testing.assert_array_equal(rle.decode("3 1 6 1", (np.int64(2), np.int64(3))), mask)
    np.testing.assert_array_equal(rle.decode("3 1 6 1", shape), mask)


def test_encode_hand_made_mask() -> None:
    mask = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=np.uint8)
    # Column 0 -> pixels 1, 2; column 1 -> pixel 6; column 2 -> pixels 7, 9.
    # Pixels 6 and 7 touch across the column boundary and form one run.
    assert rle.encode(mask) == "1 2 6 2 9 1"


def test_encode_run_spanning_columns_and_image_edges() -> None:
    assert rle.encode(np.ones((3, 2), dtype=bool)) == "1 6"
    assert rle.encode(np.zeros((3, 2), dtype=bool)) == ""
    assert rle.encode(np.array([[0, 0], [0, 7]])) == "4 1"
    assert rle.encode(np.array([[5]], dtype=np.uint16)) == "1 1"


def test_encode_multi_digit_numbers() -> None:
    mask = np.zeros((100, 150), dtype=np.uint8)
    mask[98, 99] = 1
    mask[0, 100:] = 1
    # (98, 99) is pixel 99 * 100 + 98 + 1; row 0 of column c is pixel c * 100 + 1.
    assert rle.encode(mask) == "9999 1 " + " ".join(f"{c * 100 + 1} 1" for c in range(100, 150))


def test_encode_rejects_float_and_wrong_rank() -> None:
    with pytest.raises(ValueError, match="integer or bool dtype; got float32"):
        rle.encode(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"2-D \(H, W\) array; got shape \(2, 2, 1\)"):
        rle.encode(np.zeros((2, 2, 1), dtype=np.uint8))


@pytest.mark.parametrize("empty", ["", "   ", None, float("nan")])
def test_decode_empty_spellings(empty: str | float | None) -> None:
    mask = rle.decode(empty, (3, 5))
    assert mask.shape == (3, 5)
    assert mask.dtype == np.uint8
    assert not mask.any()


def test_decode_accepts_touching_runs_and_extra_whitespace() -> None:
    np.testing.assert_array_equal(rle.decode(" 1 2\t3 1\n", (2, 2)), [[1, 1], [1, 0]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 3", r"odd number of tokens \(3\)"),
        ("1 x", r"only integers; token 1 is 'x'"),
        ("1 2.0", r"only integers; token 1 is '2.0'"),
        ("1 2,3 4", r"token 1 is '2,3'"),
        ("0 2", r"run 0: start must be >= 1; got 0"),
        ("1 1 -4 2", r"run 1: start must be >= 1; got -4"),
        ("1 0", r"run 0 \(start 1\): length must be >= 1; got 0"),
        ("14 3", r"run 0 \(start 14, length 3\) runs past the end.*H\*W = 15"),
        ("1 1 17 1", r"run 1 \(start 17, length 1\) runs past the end.*\(3, 5\)"),
        ("5 2 1 1", r"sorted and non-overlapping; run 1 \(start 1\) begins before run 0"),
        ("1 3 3 1", r"run 1 \(start 3\) begins before run 0 \(start 1, length 3\)"),
        ("1 " + "9" * 25, r"token 1 is too large"),
    ],
)
def test_decode_rejects_malformed(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rle.decode(text, (3, 5))


@pytest.mark.parametrize("value", [3.0, 7, b"1 2"])
def test_decode_rejects_non_string(value: object) -> None:
    with pytest.raises(ValueError, match="must be a string, NaN or None"):
        rle.decode(value, (2, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3,), r"\(H, W\) tuple; got \(3,\)"),
        ((2, 2, 1), r"\(H, W\) tuple"),
        ("ab", r"\(H, W\) tuple"),
        ((2.0, 2), "two integers"),
        ((True, 2), "two integers"),
        ((0, 2), r"positive; got \(0, 2\)"),
        ((2, -1), "positive"),
    ],
)
def test_decode_rejects_bad_shape(shape: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rle.decode("1 1", shape)  # type: ignore[arg-type]


def test_check_rle_names_the_place() -> None:
    rle_check.check_rle("1 2 5 1")
    rle_check.check_rle(float("nan"))
    with pytest.raises(ValueError, match=r"train\.csv row 7 run 1: start must be >= 1"):
        rle_check.check_rle("3 1 0 1", "train.csv row 7")


@settings(max_examples=300, deadline=None)
@given(masks)
def test_round_trip_matches_reference(mask: np.ndarray) -> None:
    text = rle.encode(mask)
    assert text == encode_by_pixel_walk(mask)
    np.testing.assert_array_equal(rle.decode(text, mask.shape), (mask != 0).astype(np.uint8))


@settings(max_examples=100, deadline=None)
@given(masks)
def test_encode_is_canonical(mask: np.ndarray) -> None:
    values = np.array(rle.encode(mask).split(), dtype=np.int64)
    starts, lengths = values[0::2], values[1::2]
    assert (lengths >= 1).all()
    # Runs are sorted with at least one background pixel between them.
    assert (starts[1:] > starts[:-1] + lengths[:-1]).all()


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (7, 5), (350, 525)])
@pytest.mark.parametrize("fill", [0, 1])
def test_round_trip_uniform_masks(shape: tuple[int, int], fill: int) -> None:
    mask = np.full(shape, fill, dtype=np.uint8)
    text = rle.encode(mask)
    assert text == ("" if fill == 0 else f"1 {math.prod(shape)}")
    np.testing.assert_array_equal(rle.decode(text, shape), mask)


@settings(max_examples=50, deadline=None)
@given(st.lists(masks, min_size=0, max_size=5))
def test_encode_batch_equals_encode(batch: list[np.ndarray]) -> None:
    assert rle.encode_batch(batch) == [rle.encode(mask) for mask in batch]


def test_encode_batch_of_array_and_generator() -> None:
    batch = np.zeros((3, 4, 4), dtype=np.uint8)
    batch[1, 0, 0] = 1
    batch[2] = 1
    assert rle.encode_batch(batch) == ["", "1 1", "1 16"]
    assert rle.encode_batch(mask for mask in batch) == ["", "1 1", "1 16"]


def test_union_rles_merges_overlapping_and_touching_runs() -> None:
    # 1-3 and 4-5 touch; 10-11 and 11-15 overlap; 30 stands alone; order is irrelevant.
    assert rle.union_rles(["11 5 30 1", "1 3 10 2", "4 2"]) == "1 5 10 6 30 1"


def test_union_rles_contained_run_and_empties() -> None:
    assert rle.union_rles(["2 10", "", None, float("nan"), "4 2"]) == "2 10"
    assert rle.union_rles(["", None]) == ""
    assert rle.union_rles([]) == ""


def test_union_rles_names_bad_input() -> None:
    with pytest.raises(ValueError, match=r"rles\[1\] must contain only integers"):
        rle.union_rles(["1 2", "1 a"])
    with pytest.raises(ValueError, match=r"rles\[0\] run 0 \(start 3\): length must be >= 1"):
        rle.union_rles(["3 0"])


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_union_rles_equals_mask_union(data: st.DataObject) -> None:
    shape = data.draw(st.tuples(st.integers(1, 8), st.integers(1, 8)))
    parts = data.draw(st.lists(hnp.arrays(np.bool_, shape), min_size=1, max_size=4))
    union = np.logical_or.reduce(parts)
    assert rle.union_rles([rle.encode(part) for part in parts]) == rle.encode(union)


def test_check_rles_names_the_first_bad_string() -> None:
    rle_check.check_rles(["1 2", "", None, "+3 1 7 2"])
    names = ["row 2", "row 3", "row 4"]
    with pytest.raises(ValueError, match="row 3 must hold 'start length' pairs"):
        rle_check.check_rles(["1 2", "1 2 3", "4"], names)
    with pytest.raises(
        ValueError, match=r"row 4 runs must be sorted.*run 1 \(start 2\) begins before run 0"
    ):
        rle_check.check_rles(["1 2", "5 1 9 9", "1 3 2 1"], names)
    with pytest.raises(ValueError, match=r"row 3 run 0 \(start 5\): length must be >= 1; got -1"):
        rle_check.check_rles(["1 2", "5 -1", "1 3"], names)
    with pytest.raises(ValueError, match=r"rles\[1\] must contain only integers; token 0 is '1e3'"):
        rle_check.check_rles(["1 2", "1e3 1"])
    with pytest.raises(ValueError, match="names must have one entry per rle"):
        rle_check.check_rles(["1 2"], ["a", "b"])


def test_union_rles_grouped_hand_computed() -> None:
    rles = ["5 2", "1 2", "7 3", "", "2 2", "20 1"]
    groups = [0, 2, 0, 1, 2, 0]
    # Group 0: 5-6, 7-9 touch, 20 alone; group 1: empty; group 2: 1-2 and 2-3 overlap.
    assert rle.union_rles_grouped(rles, groups, 4) == ["5 5 20 1", "", "1 3", ""]


def test_union_rles_grouped_rejects_bad_groups() -> None:
    with pytest.raises(ValueError, match=r"groups must have one entry per rle \(2\); got 1"):
        rle.union_rles_grouped(["1 1", "2 1"], [0], 1)
    with pytest.raises(ValueError, match=r"groups must lie in \[0, 2\); got values from 0 to 2"):
        rle.union_rles_grouped(["1 1", "2 1"], [0, 2], 2)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(1, 60), st.integers(1, 9)), max_size=4),
            st.integers(0, 3),
        ),
        max_size=8,
    )
)
def test_union_rles_grouped_equals_union_per_group(
    items: list[tuple[list[tuple[int, int]], int]],
) -> None:
    # Runs in any order, overlapping freely: the union must not care.
    rles = [" ".join(f"{start} {length}" for start, length in runs) for runs, _ in items]
    groups = [group for _, group in items]
    expected = [
        rle.union_rles([text for text, g in zip(rles, groups, strict=True) if g == group])
        for group in range(4)
    ]
    assert rle.union_rles_grouped(rles, groups, 4) == expected
    # And each union is the pixel-wise union, checked on a 1 x 80 strip.
    for group in range(4):
        strip = np.zeros((1, 80), dtype=bool)
        for runs, g in items:
            for start, length in runs if g == group else []:
                strip[0, start - 1 : start - 1 + length] = True
        assert expected[group] == rle.encode(strip)


def test_encode_from_several_threads_and_shapes() -> None:
    # Scratch arrays are per thread and follow the mask shape; results must not mix.
    rng = np.random.default_rng(0)
    masks = [rng.random((int(h), int(w))) < 0.3 for h, w in rng.integers(1, 40, (64, 2))]
    expected = [encode_by_pixel_walk(mask) for mask in masks]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(rle.encode, masks)) == expected
