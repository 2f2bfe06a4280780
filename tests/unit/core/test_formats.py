"""The four Kaggle CSV formats: detection, reading, writing, round trips and errors."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import formats, images, mask_csv, rle

DSB2018 = Path(__file__).resolve().parents[3].parent / "shared/data/dsb2018"


def write_csv(path: Path, rows: list[list[object]], columns: list[str]) -> Path:
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def round_trip(path: Path, csv_format: str, **kwargs: object) -> formats.MaskTable:
    """Read, write back, read again; the two tables must be identical."""
    first = mask_csv.read_masks(path, **kwargs)  # type: ignore[arg-type]
    assert first.csv_format == csv_format
    again = path.with_name("again.csv")
    formats.to_kaggle_frame(first.table, csv_format, first.classes).to_csv(again, index=False)
    second = mask_csv.read_masks(again, **kwargs)  # type: ignore[arg-type]
    pd.testing.assert_frame_equal(first.table, second.table)
    assert first.classes == second.classes
    assert second.csv_format == csv_format
    return first


def as_tuples(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    return list(table.itertuples(index=False, name=None))


def test_image_label_format(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "train.csv",
        [
            ["b_1.jpg_Sugar", "1 2"],
            ["b_1.jpg_Fish", np.nan],
            ["a.jpg_Sugar", ""],
            ["a.jpg_Fish", "3 4"],
        ],
        ["Image_Label", "EncodedPixels"],
    )
    masks = round_trip(path, "image_label")
    # Classes in order of first appearance; the image id keeps its own underscore.
    assert masks.classes == ["Sugar", "Fish"]
    assert as_tuples(masks.table) == [
        ("a.jpg", "Sugar", ""),
        ("a.jpg", "Fish", "3 4"),
        ("b_1.jpg", "Sugar", "1 2"),
        ("b_1.jpg", "Fish", ""),
    ]
    assert list(masks.table.columns) == ["image_id", "class_name", "rle"]


def test_image_class_format_fills_absent_rows(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "train.csv",
        [["x.jpg", 3, "5 1"], ["w.jpg", 1, "1 1"], ["x.jpg", 10, "7 2"]],
        ["ImageId", "ClassId", "EncodedPixels"],
    )
    masks = round_trip(path, "image_class", image_ids=["v.jpg"])
    assert masks.classes == ["1", "3", "10"]  # numeric, not string, order
    assert as_tuples(masks.table) == [
        ("v.jpg", "1", ""),
        ("v.jpg", "3", ""),
        ("v.jpg", "10", ""),
        ("w.jpg", "1", "1 1"),
        ("w.jpg", "3", ""),
        ("w.jpg", "10", ""),
        ("x.jpg", "1", ""),
        ("x.jpg", "3", "5 1"),
        ("x.jpg", "10", "7 2"),
    ]


def test_image_class_written_with_every_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [["a", 2, "1 1"]], ["ImageId", "ClassId", "EncodedPixels"])
    masks = mask_csv.read_masks(path, classes=["1", "2"])
    written = formats.to_kaggle_frame(masks.table, "image_class", masks.classes)
    assert list(written.columns) == ["ImageId", "ClassId", "EncodedPixels"]
    assert written.values.tolist() == [["a", 1, ""], ["a", 2, "1 1"]]


def test_imageid_classid_format(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "train.csv",
        [["0002cc93b.jpg_1", "29102 12"], ["0002cc93b.jpg_2", ""], ["0007a71bf.jpg_02", "1 3"]],
        ["ImageId_ClassId", "EncodedPixels"],
    )
    masks = round_trip(path, "imageid_classid")
    assert masks.classes == ["1", "2"]  # "02" is class 2
    assert as_tuples(masks.table) == [
        ("0002cc93b.jpg", "1", "29102 12"),
        ("0002cc93b.jpg", "2", ""),
        ("0007a71bf.jpg", "1", ""),
        ("0007a71bf.jpg", "2", "1 3"),
    ]


def test_instances_format_unions_objects(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "train.csv",
        [["img2", "5 2"], ["img1", "10 3"], ["img1", "1 2 12 4"], ["ship0", ""]],
        ["ImageId", "EncodedPixels"],
    )
    masks = round_trip(path, "instances", instance_class="nucleus")
    assert masks.classes == ["nucleus"]
    # 10-12 and 12-15 overlap; the image with an empty row has an empty mask.
    assert as_tuples(masks.table) == [
        ("img1", "nucleus", "1 2 10 6"),
        ("img2", "nucleus", "5 2"),
        ("ship0", "nucleus", ""),
    ]
    written = formats.to_kaggle_frame(masks.table, "instances", masks.classes)
    assert list(written.columns) == ["ImageId", "EncodedPixels"]
    assert len(written) == 3


def test_instances_class_from_classes_argument(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [["a", "1 1"]], ["ImageId", "EncodedPixels"])
    assert mask_csv.read_masks(path, classes=["ship"]).classes == ["ship"]
    assert mask_csv.read_masks(path).classes == ["object"]
    with pytest.raises(ValueError, match="one name for the instances format"):
        mask_csv.read_masks(path, classes=["a", "b"])
    with pytest.raises(ValueError, match="disagree"):
        mask_csv.read_masks(path, classes=["ship"], instance_class="nucleus")


def test_given_classes_fix_order_and_reject_unknown(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "t.csv",
        [["a_Fish", "1 1"], ["a_Sugar", ""], ["b_Gravel", "2 2"]],
        ["Image_Label", "EncodedPixels"],
    )
    masks = mask_csv.read_masks(path, classes=["Sugar", "Fish", "Gravel", "Flower"])
    assert masks.classes == ["Sugar", "Fish", "Gravel", "Flower"]
    assert masks.table["class_name"].tolist()[:4] == ["Sugar", "Fish", "Gravel", "Flower"]
    assert len(masks.table) == 8
    with pytest.raises(ValueError, match=r"row 4: class 'Gravel' is not one of classes"):
        mask_csv.read_masks(path, classes=["Fish", "Sugar"])


@pytest.mark.parametrize(
    ("columns", "csv_format"),
    [
        (["Image_Label", "EncodedPixels"], "image_label"),
        (["ImageId", "ClassId", "EncodedPixels"], "image_class"),
        (["ImageId_ClassId", "EncodedPixels"], "imageid_classid"),
        (["ImageId", "EncodedPixels"], "instances"),
        (["EncodedPixels", "ImageId", "Width"], "instances"),
    ],
)
def test_detect_csv_format(columns: list[str], csv_format: str) -> None:
    assert formats.detect_csv_format(columns) == csv_format


def test_detect_csv_format_unknown_lists_known_formats() -> None:
    with pytest.raises(
        ValueError, match=r"\['id', 'rle'\] match no known CSV format.*image_label: "
    ):
        formats.detect_csv_format(["id", "rle"])
    with pytest.raises(ValueError, match="match several CSV formats"):
        formats.detect_csv_format(["Image_Label", "ImageId_ClassId", "EncodedPixels"])


def test_explicit_csv_format_checks_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [["a", "1 1"]], ["ImageId", "EncodedPixels"])
    with pytest.raises(
        ValueError, match=r"lacks column\(s\) \['ClassId'\] of CSV format 'image_class'"
    ):
        mask_csv.read_masks(path, csv_format="image_class")
    with pytest.raises(ValueError, match="csv_format must be 'auto' or one of"):
        mask_csv.read_masks(path, csv_format="coco")
    bad = write_csv(tmp_path / "bad.csv", [["a", "1 1"]], ["Id", "EncodedPixels"])
    with pytest.raises(ValueError, match=r"bad\.csv.*match no known CSV format"):
        mask_csv.read_masks(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train\.csv' does not exist"):
        mask_csv.read_masks(tmp_path / "train.csv")


def test_row_numbers_in_errors(tmp_path: Path) -> None:
    labels = ["Image_Label", "EncodedPixels"]
    path = write_csv(tmp_path / "a.csv", [["x_Fish", ""], ["nounderscore", "1 1"]], labels)
    with pytest.raises(ValueError, match=r"a\.csv' row 3: Image_Label .* got 'nounderscore'"):
        mask_csv.read_masks(path)
    path = write_csv(
        tmp_path / "b.csv",
        [["x", 1, ""], ["x", "2", ""], ["y", "two", ""]],
        ["ImageId", "ClassId", "EncodedPixels"],
    )
    with pytest.raises(ValueError, match=r"b\.csv' row 4: ClassId must be .* got 'two'"):
        mask_csv.read_masks(path)
    path = write_csv(
        tmp_path / "c.csv", [["x_1", ""], ["x_1.5", ""]], ["ImageId_ClassId", "EncodedPixels"]
    )
    with pytest.raises(ValueError, match=r"row 3: class part of ImageId_ClassId .* got '1.5'"):
        mask_csv.read_masks(path)
    path = write_csv(tmp_path / "d.csv", [["x_Fish", "1 2"], ["y_Fish", "1 2 3"]], labels)
    with pytest.raises(ValueError, match=r"d\.csv' row 3: EncodedPixels must hold"):
        mask_csv.read_masks(path)
    path = write_csv(
        tmp_path / "e.csv", [["a", "1 1"], ["b", "4 1 2 1"]], ["ImageId", "EncodedPixels"]
    )
    with pytest.raises(ValueError, match=r"e\.csv' row 3: EncodedPixels runs must be sorted"):
        mask_csv.read_masks(path)
    path = write_csv(tmp_path / "f.csv", [["a", "1 1"], ["", "4 1"]], ["ImageId", "EncodedPixels"])
    with pytest.raises(ValueError, match=r"f\.csv' row 3: the image id is empty"):
        mask_csv.read_masks(path)


def test_blank_lines_are_skipped_without_shifting_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("Image_Label,EncodedPixels\na_Fish,1 1\n\nbad,\n")
    with pytest.raises(ValueError, match="row 4: Image_Label"):
        mask_csv.read_masks(path)


def test_duplicate_rows_name_both_rows(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "t.csv",
        [["a", 1, "1 1"], ["b", 1, ""], ["a", 1, "5 1"]],
        ["ImageId", "ClassId", "EncodedPixels"],
    )
    with pytest.raises(ValueError, match=r"rows 2 and 4 both give image 'a', class '1'"):
        mask_csv.read_masks(path)


def test_write_submission_validates_table() -> None:
    table = pd.DataFrame(
        {"image_id": ["a", "a", "b"], "class_name": ["1", "2", "1"], "rle": ["1 1", None, ""]}
    )
    with pytest.raises(ValueError, match=r"lacks image 'b' class\(es\) \['2'\]"):
        formats.to_kaggle_frame(table, "image_class", ["1", "2"])
    with pytest.raises(ValueError, match="table class '2' is not one of classes"):
        formats.to_kaggle_frame(table, "image_label", ["1"])
    with pytest.raises(ValueError, match="csv_format must be one of"):
        formats.to_kaggle_frame(table, "auto", ["1", "2"])
    with pytest.raises(ValueError, match=r"missing \['rle'\]"):
        formats.to_kaggle_frame(table.drop(columns="rle"), "image_label", ["1", "2"])
    with pytest.raises(ValueError, match="integer class names"):
        formats.to_kaggle_frame(table, "image_class", ["Fish", "2"])
    with pytest.raises(ValueError, match="must not contain '_'"):
        formats.to_kaggle_frame(table, "image_label", ["a_b"])
    with pytest.raises(ValueError, match="instances format holds one class"):
        formats.to_kaggle_frame(table, "instances", ["1", "2"])
    doubled = pd.concat([table, table.iloc[:1]])
    with pytest.raises(ValueError, match="several rows for image 'a', class '1'"):
        formats.to_kaggle_frame(doubled, "image_label", ["1", "2"])


def test_write_submission_orders_rows_and_blanks_missing_rle() -> None:
    table = pd.DataFrame(
        {
            "image_id": ["b.jpg", "a.jpg", "b.jpg", "a.jpg"],
            "class_name": ["Fish", "Sugar", "Sugar", "Fish"],
            "rle": [np.nan, "1 1", "2 2", None],
        }
    )
    written = formats.to_kaggle_frame(table, "image_label", ["Sugar", "Fish"])
    assert written.values.tolist() == [
        ["a.jpg_Sugar", "1 1"],
        ["a.jpg_Fish", ""],
        ["b.jpg_Sugar", "2 2"],
        ["b.jpg_Fish", ""],
    ]


def test_dsb2018_through_the_instances_format() -> None:
    csv = DSB2018 / "train.csv"
    if not csv.is_file():
        pytest.skip(f"dsb2018 data set not found at {DSB2018}; it lives outside the repository")
    masks = mask_csv.read_masks(csv, instance_class="nucleus")
    assert masks.csv_format == "instances"
    assert masks.classes == ["nucleus"]
    assert len(masks.table) == 664
    assert (masks.table["rle"] != "").all()
    for image_id, text in masks.table[["image_id", "rle"]].iloc[::166].itertuples(index=False):
        shape = images.read_image_size(images.resolve_image_path(DSB2018 / "images", image_id))
        mask = rle.decode(text, shape)
        assert 0 < mask.sum() < mask.size
        assert rle.encode(mask) == text
