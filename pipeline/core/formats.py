"""The Kaggle CSV formats of RLE masks, and the one canonical table they map to.

The formats' column facts and header detection, the canonical ``MaskTable``, and
``to_kaggle_frame``, which lays a canonical table out as a format's CSV. Reading a CSV
into the table is ``mask_csv.read_masks``.

The canonical table has the columns ``image_id``, ``class_name`` and ``rle``: exactly
one row per image and class, ``""`` for an empty mask, sorted by image id and then by
class order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import pandas as pd

CsvFormat = Literal["image_label", "image_class", "imageid_classid", "instances"]
CSV_FORMATS: tuple[str, ...] = get_args(CsvFormat)
CSV_FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "image_label": ("Image_Label", "EncodedPixels"),
    "image_class": ("ImageId", "ClassId", "EncodedPixels"),
    "imageid_classid": ("ImageId_ClassId", "EncodedPixels"),
    "instances": ("ImageId", "EncodedPixels"),
}
CANONICAL_COLUMNS: tuple[str, ...] = ("image_id", "class_name", "rle")
# Formats whose class names are integers (Severstal's ClassId) and sort numerically.
_NUMERIC_CLASS_FORMATS = ("image_class", "imageid_classid")
# Formats that join image and class with "_" and split at the last one on reading.
_JOINED_FORMATS = ("image_label", "imageid_classid")


@dataclass(frozen=True)
class MaskTable:
    """Masks of a data set as RLE strings, one row per image and class.

    Attributes:
        table: columns ``image_id``, ``class_name``, ``rle`` (all str; ``""`` = empty),
            sorted by image id, then by the order of ``classes``.
        classes: class names in their canonical order.
        csv_format: the CSV format the table was read from, one of ``CSV_FORMATS``.
    """

    table: pd.DataFrame
    classes: list[str]
    csv_format: str


def detect_csv_format(columns: Sequence[str]) -> str:
    """Name the CSV format that a header matches.

    Extra columns are allowed; when several formats match, the one that uses the most
    columns wins (``ImageId,ClassId,EncodedPixels`` is image_class, not instances).

    Args:
        columns: the CSV header.

    Returns:
        One of ``CSV_FORMATS``.

    Raises:
        ValueError: no format matches, or two equally specific formats do.
    """
    present = set(columns)
    matches = [name for name in CSV_FORMATS if set(CSV_FORMAT_COLUMNS[name]) <= present]
    if not matches:
        raise ValueError(
            f"CSV columns {list(columns)} match no known CSV format; expected one of "
            + "; ".join(f"{name}: {','.join(CSV_FORMAT_COLUMNS[name])}" for name in CSV_FORMATS)
        )
    widest = max(len(CSV_FORMAT_COLUMNS[name]) for name in matches)
    best = [name for name in matches if len(CSV_FORMAT_COLUMNS[name]) == widest]
    if len(best) > 1:
        raise ValueError(
            f"CSV columns {list(columns)} match several CSV formats ({', '.join(best)}); "
            "name the format explicitly (config key data.csv_format)"
        )
    return best[0]


def to_kaggle_frame(table: pd.DataFrame, csv_format: str, classes: Sequence[str]) -> pd.DataFrame:
    """Lay out a canonical table as a competition CSV.

    Args:
        table: columns ``image_id``, ``class_name``, ``rle``; exactly one row per image
            and class of ``classes``; ``""``, NaN or ``None`` for an empty mask.
        csv_format: one of ``CSV_FORMATS``.
        classes: the class names in order (one name for instances).

    Returns:
        A DataFrame with the format's columns (e.g. ``Image_Label,EncodedPixels``), one
        row per image and class (per image for instances), sorted by image id then
        class order, empty masks as ``""``; ready for ``to_csv(index=False)``.

    Raises:
        ValueError: unknown CSV format, missing columns, a class not in ``classes``, a
            missing or duplicate (image, class) pair, or class names the format cannot
            hold (not integers for Severstal formats, containing "_" for joined ids,
            more than one class for instances).
    """
    if csv_format not in CSV_FORMATS:
        raise ValueError(f"csv_format must be one of {list(CSV_FORMATS)}; got {csv_format!r}")
    class_order = _check_names(classes, "classes")
    missing = [column for column in CANONICAL_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"table must have columns {list(CANONICAL_COLUMNS)}; missing {missing}")
    _check_writable_classes(csv_format, class_order)
    frame = table.loc[:, list(CANONICAL_COLUMNS)].copy()
    frame["rle"] = frame["rle"].astype(object).where(frame["rle"].notna(), "")
    _check_complete(frame, class_order)
    rank = {name: position for position, name in enumerate(class_order)}
    frame["class_rank"] = frame["class_name"].map(rank)
    frame = frame.sort_values(["image_id", "class_rank"], kind="stable")
    images = frame["image_id"].astype(str)
    names = frame["class_name"].astype(str)
    rles = frame["rle"].astype(str).tolist()
    columns: dict[str, list[str] | list[int]]
    if csv_format == "image_label":
        columns = {"Image_Label": (images + "_" + names).tolist(), "EncodedPixels": rles}
    elif csv_format == "image_class":
        columns = {
            "ImageId": images.tolist(),
            "ClassId": names.astype(int).tolist(),
            "EncodedPixels": rles,
        }
    elif csv_format == "imageid_classid":
        columns = {"ImageId_ClassId": (images + "_" + names).tolist(), "EncodedPixels": rles}
    else:
        columns = {"ImageId": images.tolist(), "EncodedPixels": rles}
    return pd.DataFrame(columns)


def _check_names(names: Sequence[str], argument: str) -> list[str]:
    """A non-empty list of distinct, non-empty strings (ints become strings)."""
    if isinstance(names, str):
        raise ValueError(f"{argument} must be a sequence of strings; got the string {names!r}")
    result = []
    for name in names:
        if isinstance(name, int) and not isinstance(name, bool):
            name = str(name)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{argument} must hold non-empty strings; got {name!r}")
        result.append(name)
    if not result and argument == "classes":
        raise ValueError("classes must not be empty")
    if len(set(result)) != len(result):
        repeated = sorted({name for name in result if result.count(name) > 1})
        raise ValueError(f"{argument} must be distinct; {repeated} repeat")
    return result


def _check_writable_classes(csv_format: str, classes: list[str]) -> None:
    """Class names that the format can hold and read back unchanged."""
    if csv_format == "instances" and len(classes) != 1:
        raise ValueError(f"the instances format holds one class; got classes {classes}")
    if csv_format in _NUMERIC_CLASS_FORMATS:
        bad = [name for name in classes if not (name.isascii() and name.isdigit())]
        bad += [name for name in classes if name != name.lstrip("0") and name != "0"]
        if bad:
            raise ValueError(
                f"CSV format {csv_format!r} needs integer class names without leading "
                f"zeros; got {bad}"
            )
    if csv_format in _JOINED_FORMATS:
        bad = [name for name in classes if "_" in name]
        if bad:
            raise ValueError(
                f"CSV format {csv_format!r} joins image and class with '_', so class names "
                f"must not contain '_'; got {bad}"
            )


def _check_complete(frame: pd.DataFrame, classes: list[str]) -> None:
    """Exactly one row per image and class."""
    unknown = ~frame["class_name"].isin(classes)
    if unknown.any():
        raise ValueError(
            f"table class {frame.loc[unknown, 'class_name'].iloc[0]!r} is not one of "
            f"classes {classes}"
        )
    repeated = frame.duplicated(["image_id", "class_name"])
    if repeated.any():
        first = frame.loc[repeated].iloc[0]
        raise ValueError(
            f"table has several rows for image {first['image_id']!r}, class "
            f"{first['class_name']!r}; expected one row per image and class"
        )
    counts = frame.groupby("image_id", sort=True)["class_name"].size()
    short = counts[counts < len(classes)]
    if len(short):
        image_id = short.index[0]
        present = set(frame.loc[frame["image_id"] == image_id, "class_name"])
        absent = [name for name in classes if name not in present]
        raise ValueError(
            f"table lacks image {image_id!r} class(es) {absent}; expected one row per "
            "image and class"
        )


def read_kaggle_csv(path: Path, error: Callable[[str], Exception]) -> pd.DataFrame:
    """A Kaggle CSV as written: every cell a str, empty cells "", blank lines kept (so
    frame position ``i`` is file line ``i + 2``). A file pandas cannot parse raises
    ``error(<pandas' message>)``."""
    try:
        return pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            na_values=[],
            skip_blank_lines=False,
            encoding="utf-8-sig",
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise error(str(exc)) from None
