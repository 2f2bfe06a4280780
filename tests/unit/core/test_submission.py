"""Submission files: validation errors, sample order, atomic writes, README rows, scores."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import metrics, rle
from pipeline.core.submission import (
    README_HEADER,
    make_submission_frame,
    record_submission,
    score_submission,
    write_submission_file,
)
from pipeline.core.submission_check import (
    SubmissionError,
    positive_rates,
    read_submission,
    validate_submission,
)

SHAPE = (4, 5)  # 20 pixels per mask
CLASSES = ["x", "y"]
IMAGES = ["a.jpg", "b.jpg"]


def clouds_frame(rles: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows a.jpg_x, a.jpg_y, b.jpg_x, b.jpg_y (spreadsheet rows 2..5)."""
    rles = rles or {}
    keys = [f"{image}_{name}" for image in IMAGES for name in CLASSES]
    return pd.DataFrame({"Image_Label": keys, "EncodedPixels": [rles.get(k, "") for k in keys]})


VALID = {"a.jpg_x": "1 3 10 2", "b.jpg_y": "18 3"}


def check(frame: pd.DataFrame, csv_format: str = "image_label", **kwargs: object) -> None:
    arguments: dict[str, object] = {"classes": CLASSES, "image_ids": IMAGES, "shapes": SHAPE}
    arguments.update(kwargs)
    validate_submission(frame, csv_format, **arguments)  # type: ignore[arg-type]


def test_valid_submission_passes() -> None:
    check(clouds_frame(VALID))
    with_nan = clouds_frame(VALID)
    with_nan.loc[1, "EncodedPixels"] = np.nan
    check(with_nan)


def test_missing_row_names_image_and_class() -> None:
    frame = clouds_frame(VALID).drop(index=3)
    with pytest.raises(SubmissionError, match=r"no row for image 'b.jpg', class 'y'.*1 pair"):
        check(frame)


def test_duplicate_row_names_both_rows() -> None:
    frame = pd.concat([clouds_frame(VALID), clouds_frame().iloc[[0]]], ignore_index=True)
    with pytest.raises(SubmissionError, match=r"rows 2 and 6 both give image 'a.jpg', class 'x'"):
        check(frame)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("1 3 q 2", r"row 4, column EncodedPixels must contain only integers; token 2 is 'q'"),
        ("1 3 10", r"row 4, column EncodedPixels must hold 'start length' pairs; got an odd"),
        ("5 2 1 2", r"row 4, column EncodedPixels runs must be sorted and non-overlapping"),
        ("1 3 3 2", r"row 4, column EncodedPixels runs must be sorted"),
        ("0 2", r"row 4, column EncodedPixels run 0: start must be >= 1; got 0"),
    ],
)
def test_bad_rle_names_row_and_column(bad: str, message: str) -> None:
    with pytest.raises(SubmissionError, match=message):
        check(clouds_frame({**VALID, "b.jpg_x": bad}))


def test_run_past_the_image() -> None:
    check(clouds_frame({"a.jpg_y": "19 2"}))  # pixels 19 and 20: the last two
    with pytest.raises(
        SubmissionError,
        match=r"submission row 3, column EncodedPixels: run 1 \(start 19, length 3\) ends at "
        r"pixel 21, past the end of image 'a.jpg': shape \(4, 5\) has H\*W = 20 pixels",
    ):
        check(clouds_frame({"a.jpg_y": "1 2 19 3"}))


def test_per_image_shapes() -> None:
    frame = clouds_frame({"b.jpg_x": "1 30"})
    check(frame, shapes={"a.jpg": (4, 5), "b.jpg": (6, 5)})
    with pytest.raises(
        SubmissionError, match=r"row 4.*image 'b.jpg': shape \(4, 5\) has H\*W = 20"
    ):
        check(frame, shapes={"a.jpg": (6, 5), "b.jpg": (4, 5)})
    with pytest.raises(ValueError, match=r"shapes has no \(H, W\) for image 'b.jpg'"):
        check(frame, shapes={"a.jpg": (4, 5)})


def test_wrong_header() -> None:
    frame = clouds_frame(VALID).rename(columns={"EncodedPixels": "Pixels"})
    with pytest.raises(
        SubmissionError,
        match=r"row 1 \(header\): expected exactly the columns Image_Label,EncodedPixels of "
        r"CSV format 'image_label'; got Image_Label,Pixels",
    ):
        check(frame)
    with pytest.raises(SubmissionError, match="got Image_Label,EncodedPixels,extra"):
        check(clouds_frame(VALID).assign(extra=""))


def test_unknown_image_and_class_and_bad_key() -> None:
    frame = clouds_frame(VALID)
    frame.loc[2, "Image_Label"] = "c.jpg_x"
    with pytest.raises(SubmissionError, match=r"row 4, column Image_Label: unknown image 'c.jpg'"):
        check(frame)
    frame.loc[2, "Image_Label"] = "b.jpg_z"
    with pytest.raises(SubmissionError, match=r"row 4, column Image_Label: unknown class 'z'"):
        check(frame)
    frame.loc[2, "Image_Label"] = "nounderscore"
    with pytest.raises(SubmissionError, match=r"row 4.*expected '<image>_<class>'"):
        check(frame)


def test_where_names_the_file() -> None:
    with pytest.raises(SubmissionError, match=r"^submission 'sub.csv' row 2, column Encoded"):
        check(clouds_frame({"a.jpg_x": "x"}), where="submission 'sub.csv'")


def test_blank_line_keeps_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "sub.csv"
    path.write_text("Image_Label,EncodedPixels\na.jpg_x,1 1\n\na.jpg_y,\nb.jpg_x,\nb.jpg_y,\n")
    with pytest.raises(SubmissionError, match=r"row 3, column Image_Label: expected"):
        check(read_submission(path))


def test_image_class_and_imageid_classid_formats() -> None:
    frame = pd.DataFrame(
        {"ImageId": ["a", "a", "b", "b"], "ClassId": [1, 2, 1, 2], "EncodedPixels": ["1 2"] * 4}
    )
    check(frame, "image_class", classes=["1", "2"], image_ids=["a", "b"])
    frame.loc[3, "ClassId"] = 3
    with pytest.raises(SubmissionError, match=r"row 5, column ClassId: unknown class '3'"):
        check(frame, "image_class", classes=["1", "2"], image_ids=["a", "b"])
    joined = pd.DataFrame({"ImageId_ClassId": ["a_1", "a_2"], "EncodedPixels": ["", "3 1"]})
    check(joined, "imageid_classid", classes=["1", "2"], image_ids=["a"])


def test_instances_format() -> None:
    frame = pd.DataFrame({"ImageId": ["a", "a", "b"], "EncodedPixels": ["1 2", "5 2", ""]})
    check(frame, "instances", classes=["object"], image_ids=["a", "b"])
    with pytest.raises(SubmissionError, match=r"no row for image 'c'"):
        check(frame, "instances", classes=["object"], image_ids=["a", "b", "c"])
    frame.loc[1, "EncodedPixels"] = "2 2"
    with pytest.raises(SubmissionError, match=r"rows 2 and 3 \(image 'a'\) overlap from pixel"):
        check(frame, "instances", classes=["object"], image_ids=["a", "b"])


def canonical(rles: dict[tuple[str, str], str]) -> pd.DataFrame:
    rows = [(image, name, rles.get((image, name), "")) for image in IMAGES for name in CLASSES]
    return pd.DataFrame(rows, columns=["image_id", "class_name", "rle"])


def test_order_follows_the_sample() -> None:
    table = canonical({("a.jpg", "x"): "1 2"})
    sample = clouds_frame().iloc[[3, 0, 2, 1]].reset_index(drop=True)
    frame = make_submission_frame(table, "image_label", CLASSES, sample)
    assert frame["Image_Label"].tolist() == sample["Image_Label"].tolist()
    assert frame["EncodedPixels"].tolist() == ["", "1 2", "", ""]
    unsorted = make_submission_frame(table.iloc[::-1], "image_label", CLASSES, None)
    assert unsorted["Image_Label"].tolist() == clouds_frame()["Image_Label"].tolist()


def test_sample_mismatches_are_errors() -> None:
    table = canonical({})
    extra_row = pd.concat(
        [clouds_frame(), pd.DataFrame({"Image_Label": ["c.jpg_x"], "EncodedPixels": ["1 1"]})]
    )
    with pytest.raises(SubmissionError, match=r"sample row 6: image 'c.jpg' has no prediction"):
        make_submission_frame(table, "image_label", CLASSES, extra_row)
    with pytest.raises(SubmissionError, match=r"image 'b.jpg', which the sample does not list"):
        make_submission_frame(table, "image_label", CLASSES, clouds_frame().iloc[:2])
    only_x = clouds_frame().iloc[[0, 2]]
    with pytest.raises(SubmissionError, match=r"image 'a.jpg', class 'y' has no row in the sample"):
        make_submission_frame(table, "image_label", CLASSES, only_x)


def test_severstal_sample_with_one_row_per_image() -> None:
    table = pd.DataFrame(
        {"image_id": ["a", "a", "b", "b"], "class_name": ["1", "2"] * 2, "rle": [""] * 4}
    )
    sample = pd.DataFrame({"ImageId": ["b", "a"], "EncodedPixels": ["1 1"] * 2, "ClassId": [1, 1]})
    frame = make_submission_frame(table, "image_class", ["1", "2"], sample)
    assert list(zip(frame["ImageId"], frame["ClassId"], strict=True)) == [
        ("b", 1),
        ("b", 2),
        ("a", 1),
        ("a", 2),
    ]


def test_write_is_atomic_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "out" / "sub.csv"
    written = write_submission_file(
        clouds_frame(VALID), path, "image_label", CLASSES, IMAGES, SHAPE
    )
    assert written == path
    assert path.read_text().splitlines()[:2] == ["Image_Label,EncodedPixels", "a.jpg_x,1 3 10 2"]
    check(read_submission(path))
    before = path.read_bytes()
    bad = clouds_frame({"a.jpg_x": "1 99"})
    with pytest.raises(SubmissionError, match=r"submission '.*sub.csv' row 2"):
        write_submission_file(bad, path, "image_label", CLASSES, IMAGES, SHAPE)
    assert path.read_bytes() == before
    fresh = tmp_path / "never.csv"
    with pytest.raises(SubmissionError):
        write_submission_file(bad, fresh, "image_label", CLASSES, IMAGES, SHAPE)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["sub.csv"]


def test_record_submission_appends_rows(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Submissions\n\n" + README_HEADER)
    record_submission(readme, "base_20240101-1200.csv", "base", None, 0.66312, None)
    record_submission(readme, "b.csv", "exp|2", 0.48, 0.5, 0.6631)
    lines = readme.read_text().splitlines()
    assert lines[0] == "# Submissions"
    assert lines[-2:] == [
        "| base_20240101-1200.csv | base | - | 0.6631 | - |",
        r"| b.csv | exp\|2 | 0.4800 | 0.5000 | 0.6631 |",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]
    created = tmp_path / "new" / "README.md"
    record_submission(created, "c.csv", "c", 0.05, 0.1, 0.2)
    assert created.read_text() == README_HEADER + "| c.csv | c | 0.0500 | 0.1000 | 0.2000 |\n"
    with pytest.raises(ValueError, match="scores must be finite"):
        record_submission(created, "d.csv", "d", None, float("nan"), None)


def test_score_hand_computed() -> None:
    # a.jpg_x: truth pixels 1-4, prediction 3-6 -> 2 * 2 / (4 + 4) = 0.5
    # a.jpg_y: both empty -> 1; b.jpg_x: truth only -> 0; b.jpg_y: identical -> 1
    truth = clouds_frame({"a.jpg_x": "1 4", "b.jpg_x": "7 2", "b.jpg_y": "2 3 9 1"})
    pred = clouds_frame({"a.jpg_x": "3 4", "b.jpg_y": "2 3 9 1"})
    result = score_submission(pred, truth, "image_label", CLASSES, SHAPE)
    assert result["per_class"] == {"x": pytest.approx(0.25), "y": pytest.approx(1.0)}
    assert result["overall"] == pytest.approx(0.625)
    assert result["n_images"] == 2
    empty = score_submission(clouds_frame(), clouds_frame(), "image_label", CLASSES, SHAPE)
    assert empty["overall"] == 1.0


def test_score_matches_metrics_kaggle_dice() -> None:
    rng = np.random.default_rng(3)
    images = [f"i{k}" for k in range(6)]
    truth_masks = (rng.random((6, 7, 9, 2)) < 0.4).astype(np.uint8)
    pred_masks = (rng.random((6, 7, 9, 2)) < 0.4).astype(np.uint8)
    pred_masks[0] = 0
    truth_masks[0, :, :, 0] = 0

    def frame_of(masks: np.ndarray) -> pd.DataFrame:
        rles = [rle.encode(masks[i, :, :, c]) for i in range(6) for c in range(2)]
        keys = [f"{image}_{name}" for image in images for name in CLASSES]
        return pd.DataFrame({"Image_Label": keys, "EncodedPixels": rles})

    result = score_submission(
        frame_of(pred_masks), frame_of(truth_masks), "image_label", CLASSES, (7, 9)
    )
    expected = metrics.kaggle_dice(truth_masks, pred_masks.astype(np.float32), 0.5)
    assert result["overall"] == pytest.approx(expected.mean())
    assert list(result["per_class"].values()) == pytest.approx(expected.mean(axis=0).tolist())


def test_score_instances_unions_objects() -> None:
    truth = pd.DataFrame({"ImageId": ["a", "a", "b"], "EncodedPixels": ["1 2", "5 2", ""]})
    pred = pd.DataFrame({"ImageId": ["a", "b"], "EncodedPixels": ["1 6", ""]})
    result = score_submission(pred, truth, "instances", ["object"], SHAPE)
    assert result["per_class"]["object"] == pytest.approx((2 * 4 / (4 + 6) + 1) / 2)


def test_score_needs_the_same_images() -> None:
    truth = clouds_frame()
    pred = clouds_frame().iloc[:2]
    with pytest.raises(SubmissionError, match=r"^submission has no row for image 'b.jpg'"):
        score_submission(pred, truth, "image_label", CLASSES, SHAPE)


def test_positive_rates() -> None:
    frame = clouds_frame({"a.jpg_x": "1 1", "b.jpg_x": "2 2", "b.jpg_y": "3 1"})
    assert positive_rates(frame, "image_label", CLASSES) == {"x": 1.0, "y": 0.5}
    instances = pd.DataFrame({"ImageId": ["a", "a", "b"], "EncodedPixels": ["1 2", "5 2", ""]})
    assert positive_rates(instances, "instances", ["object"]) == {"object": 0.5}


def test_sample_with_repeated_rows_is_an_error() -> None:
    sample = clouds_frame().iloc[[0, 1, 2, 3, 1]]
    with pytest.raises(SubmissionError, match=r"sample rows 3 and 6 both give image 'a.jpg'"):
        make_submission_frame(canonical({}), "image_label", CLASSES, sample)


def test_instances_follow_the_sample_image_order() -> None:
    table = pd.DataFrame({"image_id": ["a", "b"], "class_name": ["object"] * 2, "rle": ["1 1", ""]})
    sample = pd.DataFrame({"ImageId": ["b", "a"], "EncodedPixels": ["1 1"] * 2})
    frame = make_submission_frame(table, "instances", ["object"], sample)
    assert frame.values.tolist() == [["b", ""], ["a", "1 1"]]


def test_instances_are_split_into_one_row_per_object() -> None:
    from pipeline.core.rle import decode, encode
    from pipeline.core.submission import split_instances

    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[0:2, 0:2] = 1  # object 1
    mask[4:6, 5:8] = 1  # object 2
    mask[3, 3] = 1  # object 3, touching neither
    frame = pd.DataFrame({"ImageId": ["b", "a"], "EncodedPixels": [encode(mask), ""]})
    split = split_instances(frame, (6, 8))
    assert split["ImageId"].tolist() == ["b", "b", "b", "a"]
    assert split["EncodedPixels"].iloc[-1] == ""  # an image without objects keeps one row
    objects = [decode(r, (6, 8)) for r in split["EncodedPixels"].iloc[:3]]
    assert [int(o.sum()) for o in objects] == [4, 1, 6]
    np.testing.assert_array_equal(np.sum(objects, axis=0), mask)  # disjoint, union = mask
    validate_submission(split, "instances", ["nucleus"], ["a", "b"], (6, 8))
    diagonal = np.eye(3, dtype=np.uint8)  # 8-connected: one object
    one = split_instances(
        pd.DataFrame({"ImageId": ["c"], "EncodedPixels": [encode(diagonal)]}), {"c": (3, 3)}
    )
    assert len(one) == 1
