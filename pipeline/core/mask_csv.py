"""Reading a Kaggle mask CSV, in any of the ``formats.CSV_FORMATS``, into a ``MaskTable``.

Every cell is checked as it is read (the format's columns, joined ids, class ids, image ids
against the data set, duplicate rows, RLE syntax), and every error names the file and
the 1-based row as a spreadsheet shows it. Instance rows (one row per object) are
unioned into one mask per image. RLE strings are checked for syntax here but decoded
elsewhere, since decoding needs each image's shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.core import rle as rle_codec
from pipeline.core import rle_check
from pipeline.core.formats import (
    _JOINED_FORMATS,
    _NUMERIC_CLASS_FORMATS,
    CANONICAL_COLUMNS,
    CSV_FORMAT_COLUMNS,
    CSV_FORMATS,
    MaskTable,
    _check_names,
    detect_csv_format,
    read_kaggle_csv,
)

logger = logging.getLogger(__name__)


def read_masks(
    path: str | Path,
    csv_format: str = "auto",
    classes: Sequence[str] | None = None,
    instance_class: str = "object",
    image_ids: Sequence[str] | None = None,
    known_images: Sequence[str] | None = None,
) -> MaskTable:
    """Read a Kaggle mask CSV into the canonical table.

    Args:
        path: the CSV file.
        csv_format: one of ``CSV_FORMATS``, or ``"auto"`` to detect it from the header.
        classes: the class names in order; a class in the file that is not listed is an
            error. When ``None``: order of first appearance (image_label), numeric
            order (image_class, imageid_classid) or ``[instance_class]`` (instances).
            For instances a given list must hold exactly one name, which is used.
        instance_class: the class name of the instances format when ``classes`` is
            ``None``.
        image_ids: images to include even if the CSV has no row for them (their masks
            are empty).
        known_images: the data set's images (its folder's): the table holds exactly
            these, those without rows with empty masks, and a row naming any other
            image is an error.

    Returns:
        The ``MaskTable``; instance rows of one image are unioned into one mask.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown CSV format, missing column, malformed ``Image_Label`` or
            ``ImageId_ClassId``, non-integer ClassId, empty image id, unknown class,
            duplicate (image, class) rows, a malformed RLE string, or a row whose
            image is not in ``known_images``; the message names the file and the
            1-based row (header = row 1).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask CSV {str(path)!r} does not exist")
    frame = _read_csv(path)
    csv_format = _resolve_csv_format(path, frame, csv_format)
    logger.info("%s: CSV format %s, %d rows", path, csv_format, len(frame))
    if csv_format == "instances":
        class_order = [_instance_class_name(classes, instance_class)]
        long = _to_long(path, frame, csv_format, class_order[0])
    else:
        long = _to_long(path, frame, csv_format, instance_class)
        class_order = _resolve_classes(path, long, csv_format, classes)
    _check_image_ids(path, long)
    if known_images is not None:
        known = _check_names(known_images, "known_images") if len(known_images) else []
        _check_known_images(path, long, set(known))
        image_ids = [*(image_ids or []), *known]
    if csv_format == "instances":
        long = _union_instances(path, long)
    else:
        _check_rles(path, long)
        _check_duplicates(path, long)
    images = set(long["image_id"].tolist())
    if image_ids is not None:
        images.update(_check_names(image_ids, "image_ids"))
    index = pd.MultiIndex.from_product(
        [sorted(images), class_order], names=["image_id", "class_name"]
    )
    observed = long.set_index(["image_id", "class_name"])["rle"]
    table = observed.reindex(index, fill_value="").reset_index()
    return MaskTable(table=table, classes=class_order, csv_format=csv_format)


def _read_csv(path: Path) -> pd.DataFrame:
    """All cells as str, empty cells as "", blank lines kept so row numbers hold."""
    frame = read_kaggle_csv(
        path, lambda message: ValueError(f"mask CSV {str(path)!r} could not be parsed: {message}")
    )
    # Row numbers as a spreadsheet shows them: the header is row 1.
    frame.index = frame.index + 2
    blank = (frame == "").all(axis=1)
    return frame.loc[~blank]


def _resolve_csv_format(path: Path, frame: pd.DataFrame, csv_format: str) -> str:
    """The requested csv_format, checked against the header, or the detected one."""
    if csv_format == "auto":
        try:
            return detect_csv_format(list(frame.columns))
        except ValueError as error:
            raise ValueError(f"mask CSV {str(path)!r}: {error}") from error
    if csv_format not in CSV_FORMATS:
        raise ValueError(
            f"csv_format must be 'auto' or one of {list(CSV_FORMATS)}; got {csv_format!r}"
        )
    missing = [column for column in CSV_FORMAT_COLUMNS[csv_format] if column not in frame.columns]
    if missing:
        raise ValueError(
            f"mask CSV {str(path)!r} lacks column(s) {missing} of CSV format {csv_format!r} "
            f"({','.join(CSV_FORMAT_COLUMNS[csv_format])}); its columns are {list(frame.columns)}"
        )
    return csv_format


def _to_long(path: Path, frame: pd.DataFrame, csv_format: str, instance_class: str) -> pd.DataFrame:
    """Columns image_id, class_name, rle, indexed by CSV row number."""
    if frame.empty:  # a header without rows: no masks at all
        return pd.DataFrame({column: pd.Series(dtype=str) for column in CANONICAL_COLUMNS})
    rles = frame["EncodedPixels"].str.strip()
    if csv_format in _JOINED_FORMATS:
        column = CSV_FORMAT_COLUMNS[csv_format][0]
        parts = frame[column].str.rpartition("_")
        bad = (parts[1] == "") | (parts[0] == "") | (parts[2] == "")
        if bad.any():
            row = bad.idxmax()
            raise ValueError(
                f"mask CSV {str(path)!r} row {row}: {column} must be "
                f"'<image>_<class>'; got {frame.at[row, column]!r}"
            )
        images, names = parts[0], parts[2]
    elif csv_format == "image_class":
        images, names = frame["ImageId"], frame["ClassId"]
    else:
        images = frame["ImageId"]
        names = pd.Series(instance_class, index=frame.index)
    if csv_format in _NUMERIC_CLASS_FORMATS:
        names = _normalise_class_ids(path, names.str.strip(), csv_format)
    return pd.DataFrame({"image_id": images, "class_name": names, "rle": rles})


def _normalise_class_ids(path: Path, names: pd.Series, csv_format: str) -> pd.Series:
    """Integer class ids as canonical decimal strings ("01" -> "1")."""
    bad = ~names.str.fullmatch(r"[0-9]+")
    if bad.any():
        row = bad.idxmax()
        column = "ClassId" if csv_format == "image_class" else "class part of ImageId_ClassId"
        raise ValueError(
            f"mask CSV {str(path)!r} row {row}: {column} must be a non-negative "
            f"integer; got {names.at[row]!r}"
        )
    return names.str.lstrip("0").replace("", "0")


def _check_image_ids(path: Path, long: pd.DataFrame) -> None:
    """Every row names an image."""
    empty = long["image_id"] == ""
    if empty.any():
        raise ValueError(f"mask CSV {str(path)!r} row {empty.idxmax()}: the image id is empty")


def _check_known_images(path: Path, long: pd.DataFrame, known: set[str]) -> None:
    """Every row names an image of the data set."""
    unknown = ~long["image_id"].isin(known)
    if unknown.any():
        rows = long.index[unknown].tolist()
        missing = long.loc[unknown, "image_id"].drop_duplicates().tolist()
        shown = ", ".join(str(row) for row in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise ValueError(
            f"mask CSV {str(path)!r} row(s) {shown}: {len(missing)} image(s) not in the "
            f"image folder, e.g. {missing[:3]}; every row must name an image of the folder"
        )


def _instance_class_name(classes: Sequence[str] | None, instance_class: str) -> str:
    """The one class name of the instances format."""
    if classes is None:
        return _check_names([instance_class], "instance_class")[0]
    given = _check_names(classes, "classes")
    if len(given) != 1:
        raise ValueError(f"classes must hold one name for the instances format; got {given}")
    if instance_class not in ("object", given[0]):
        raise ValueError(
            f"classes {given} and instance_class {instance_class!r} disagree; give one of them"
        )
    return given[0]


def _resolve_classes(
    path: Path, long: pd.DataFrame, csv_format: str, classes: Sequence[str] | None
) -> list[str]:
    """The class order; rows whose class is not in a given ``classes`` are errors."""
    if classes is None:
        found = long["class_name"].drop_duplicates().tolist()
        if csv_format in _NUMERIC_CLASS_FORMATS:
            return sorted(found, key=int)
        return found
    given = _check_names(classes, "classes")
    unknown = ~long["class_name"].isin(given)
    if unknown.any():
        row = unknown.idxmax()
        raise ValueError(
            f"mask CSV {str(path)!r} row {row}: class {long.at[row, 'class_name']!r} "
            f"is not one of classes {given}"
        )
    return given


def _check_rles(path: Path, long: pd.DataFrame) -> None:
    """RLE syntax of every row, so that a bad string is reported with its row."""
    rle_check.check_rles(long["rle"].tolist(), _row_names(path, long))


def _row_names(path: Path, long: pd.DataFrame) -> list[str]:
    """How error messages name each row's RLE."""
    prefix = f"mask CSV {str(path)!r} row "
    return [f"{prefix}{row}: EncodedPixels" for row in long.index.tolist()]


def _check_duplicates(path: Path, long: pd.DataFrame) -> None:
    """At most one row per (image, class)."""
    keys = ["image_id", "class_name"]
    repeated = long.duplicated(keys, keep="first")
    if repeated.any():
        row = repeated.idxmax()
        image_id, name = long.at[row, "image_id"], long.at[row, "class_name"]
        same = (long["image_id"] == image_id) & (long["class_name"] == name)
        first = same.idxmax()
        raise ValueError(
            f"mask CSV {str(path)!r} rows {first} and {row} both give image "
            f"{image_id!r}, class {name!r}; expected one row per image and class"
        )


def _union_instances(path: Path, long: pd.DataFrame) -> pd.DataFrame:
    """One row per image whose RLE is the union of its instance rows."""
    rles = long["rle"].tolist()
    names = _row_names(path, long)
    # Each object's RLE must be well formed on its own, even though the union would
    # also accept unsorted runs.
    rle_check.check_rles(rles, names)
    codes, image_ids = pd.factorize(long["image_id"], sort=False)
    unions = rle_codec.union_rles_grouped(rles, codes, len(image_ids), names)
    return pd.DataFrame(
        {
            "image_id": list(image_ids),
            "class_name": long["class_name"].iloc[:1].tolist() * len(image_ids),
            "rle": unions,
        }
    )
