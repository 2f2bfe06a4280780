"""Read and validate Kaggle submission files on their RLE runs, never decoding a mask.

Rows are named as a spreadsheet shows them: the header is row 1 and the frame's
``i``-th row (0-based position) is row ``i + 2``. ``read_submission`` keeps blank
lines as rows so that these numbers match the lines of the file. Bounds need only each
string's last run (runs are checked sorted first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import rle_check
from pipeline.core.formats import CSV_FORMAT_COLUMNS, CSV_FORMATS, read_kaggle_csv

_JOINED_FORMATS = ("image_label", "imageid_classid")

_RLE_COLUMN = "EncodedPixels"

Shapes = tuple[int, int] | Mapping[str, tuple[int, int]]


class SubmissionError(ValueError):
    """A submission (or truth, or sample) file breaks the competition's format.

    The message names the file, the spreadsheet row (header = row 1), the column and
    what is wrong.
    """


def read_submission(path: str | Path) -> pd.DataFrame:
    """Read a submission-like CSV with every cell as ``str`` (empty cells as ``""``).

    Blank lines are kept as rows of empty cells so that row ``i`` (0-based) of the
    frame is line ``i + 2`` of the file; validation then reports them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SubmissionError: the file is not parseable CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission file {str(path)!r} does not exist")
    return read_kaggle_csv(
        path,
        lambda message: SubmissionError(
            f"submission file {str(path)!r} is not valid CSV: {message}"
        ),
    )


def validate_submission(
    frame: pd.DataFrame,
    csv_format: str,
    classes: Sequence[str],
    image_ids: Sequence[str],
    shapes: Shapes,
    where: str = "submission",
) -> None:
    """Check a submission frame against the competition's format.

    Checks the header (exactly the format's columns, in order), that every (image,
    class) pair of ``image_ids`` x ``classes`` has exactly one row (instances: every
    image at least one row, and instance masks of one image do not overlap), and that
    every RLE string is well formed (integer ``start length`` pairs, sorted,
    non-overlapping) and ends inside its image. No mask is decoded.

    Args:
        frame: the submission, e.g. from ``read_submission`` or
            ``make_submission_frame``; ``EncodedPixels`` cells are str, ``""``, NaN or
            None (empty masks).
        csv_format: one of ``formats.CSV_FORMATS``.
        classes: the class names (one name for instances).
        image_ids: the images the submission must cover, e.g. the sample's.
        shapes: ``(H, W)`` of every mask (a fixed submission size), or a mapping
            image_id -> ``(H, W)`` (submissions at each image's own size).
        where: how messages name the frame, e.g. ``"submission 'sub.csv'"``.

    Raises:
        SubmissionError: the first problem found, naming row, column and cause.
        ValueError: bad arguments (unknown CSV format, repeated names, missing shape).
    """
    class_names, images = _check_arguments(csv_format, classes, image_ids)
    expected = list(CSV_FORMAT_COLUMNS[csv_format])
    got = [str(column) for column in frame.columns]
    if got != expected:
        raise SubmissionError(
            f"{where} row 1 (header): expected exactly the columns {','.join(expected)} "
            f"of CSV format {csv_format!r}; got {','.join(got) or '(none)'}"
        )
    n_pixels = _pixel_counts(images, shapes)
    keys_image, keys_class = _split_keys(frame, csv_format, where)
    image_code = _codes(keys_image, images, where, "image", csv_format)
    class_code = _codes(keys_class, class_names, where, "class", csv_format)
    if csv_format == "instances":
        _check_every_image(image_code, images, where)
    else:
        _check_pairs(image_code * len(class_names) + class_code, images, class_names, where)
    rles = frame[_RLE_COLUMN].tolist()
    row_names = [f"{where} row {row}, column {_RLE_COLUMN}" for row in range(2, len(rles) + 2)]
    try:
        rle_check.check_rles(rles, row_names)
    except ValueError as error:
        raise SubmissionError(str(error)) from None
    _check_bounds(rles, image_code, images, n_pixels, shapes, where)
    if csv_format == "instances":
        _check_no_overlap(rles, image_code, images, where)


def positive_rates(
    frame: pd.DataFrame, csv_format: str, classes: Sequence[str]
) -> dict[str, float]:
    """Share of non-empty masks per class (instances: of images with any object).

    ``frame`` is a submission in ``csv_format``; a class with no row gets NaN.
    """
    images, names = _split_keys(frame, csv_format, "submission")
    class_code = _codes(names, list(classes), "submission", "class", csv_format)
    filled = np.array([_is_filled(value) for value in frame[_RLE_COLUMN].tolist()], dtype=bool)
    if csv_format == "instances":
        per_image = pd.Series(filled).groupby(images).any()
        return {classes[0]: float(per_image.mean()) if len(per_image) else float("nan")}
    counts = np.bincount(class_code, minlength=len(classes))
    positives = np.bincount(class_code, filled, minlength=len(classes))
    return {
        name: float(positives[i] / counts[i]) if counts[i] else float("nan")
        for i, name in enumerate(classes)
    }


def _check_arguments(
    csv_format: str, classes: Sequence[str], image_ids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Class names and image ids as lists of distinct non-empty strings."""
    if csv_format not in CSV_FORMATS:
        raise ValueError(f"csv_format must be one of {list(CSV_FORMATS)}; got {csv_format!r}")
    class_names = [str(name) for name in classes]
    images = [str(image_id) for image_id in image_ids]
    for argument, names in (("classes", class_names), ("image_ids", images)):
        if not names or "" in names or len(set(names)) != len(names):
            raise ValueError(f"{argument} must be distinct non-empty strings; got {names[:10]}")
    if csv_format == "instances" and len(class_names) != 1:
        raise ValueError(f"the instances format has one class; got classes {class_names}")
    if csv_format in _JOINED_FORMATS and any("_" in name for name in class_names):
        raise ValueError(
            f"CSV format {csv_format!r} joins with '_'; class names {class_names} hold '_'"
        )
    return class_names, images


def _pixel_counts(images: Sequence[str], shapes: Shapes) -> np.ndarray:
    """H*W of every image as int64, from one shape or a per-image mapping."""
    if isinstance(shapes, Mapping):
        missing = [image_id for image_id in images if image_id not in shapes]
        if missing:
            raise ValueError(
                f"shapes has no (H, W) for image {missing[0]!r} ({len(missing)} in all)"
            )
        sizes = [_check_shape(shapes[image_id], image_id) for image_id in images]
        return np.array([height * width for height, width in sizes], dtype=np.int64)
    height, width = _check_shape(shapes, "every image")
    return np.full(len(images), height * width, dtype=np.int64)


def _check_shape(shape: object, image_id: str) -> tuple[int, int]:
    """``shape`` as two positive Python ints, or an error naming whose shape it is."""
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 2
        or not all(isinstance(side, (int, np.integer)) and side >= 1 for side in shape)
    ):
        raise ValueError(
            f"shape of {image_id} must be (H, W) with positive integers; got {shape!r}"
        )
    return int(shape[0]), int(shape[1])


def _split_keys(frame: pd.DataFrame, csv_format: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Image id and class name of every row, as object arrays of str."""
    if csv_format not in CSV_FORMATS:
        raise ValueError(f"csv_format must be one of {list(CSV_FORMATS)}; got {csv_format!r}")
    keys = [column for column in CSV_FORMAT_COLUMNS[csv_format] if column != _RLE_COLUMN]
    missing = [column for column in (*keys, _RLE_COLUMN) if column not in frame.columns]
    if missing:
        raise SubmissionError(
            f"{where} row 1 (header): lacks column(s) {missing} of CSV format {csv_format!r}; "
            f"got {[str(column) for column in frame.columns]}"
        )
    first = frame[keys[0]].fillna("").astype(str)
    if csv_format in _JOINED_FORMATS:
        parts = first.str.rpartition("_")
        bad = ((parts[0] == "") | (parts[1] == "") | (parts[2] == "")).to_numpy()
        if bad.any():
            position = int(np.argmax(bad))
            raise SubmissionError(
                f"{where} row {position + 2}, column {keys[0]}: expected '<image>_<class>'; "
                f"got {first.iloc[position]!r}"
            )
        return parts[0].to_numpy(dtype=object), parts[2].to_numpy(dtype=object)
    images = first.to_numpy(dtype=object)
    empty = images == ""
    if empty.any():
        raise SubmissionError(
            f"{where} row {int(np.argmax(empty)) + 2}, column {keys[0]}: the image id is empty"
        )
    if csv_format == "image_class":
        names = frame["ClassId"].fillna("").astype(str).str.strip().to_numpy(dtype=object)
        return images, names
    return images, np.full(len(frame), "", dtype=object)


def _codes(
    values: np.ndarray, known: list[str], where: str, what: str, csv_format: str
) -> np.ndarray:
    """Position of every value in ``known``; an unknown value is an error naming its row."""
    if what == "class" and csv_format == "instances":
        return np.zeros(len(values), dtype=np.int64)
    codes = pd.Index(known).get_indexer(pd.Index(values))
    unknown = codes < 0
    if unknown.any():
        position = int(np.argmax(unknown))
        is_class_id = what == "class" and csv_format == "image_class"
        column = "ClassId" if is_class_id else CSV_FORMAT_COLUMNS[csv_format][0]
        shown = known if len(known) <= 10 else [*known[:10], "..."]
        raise SubmissionError(
            f"{where} row {position + 2}, column {column}: unknown {what} "
            f"{values[position]!r}; expected one of {shown} ({int(unknown.sum())} such row(s))"
        )
    return codes.astype(np.int64)


def _check_pairs(pair: np.ndarray, images: list[str], classes: list[str], where: str) -> None:
    """Exactly one row per (image, class) pair, given pair codes image * C + class."""
    repeated = pd.Series(pair).duplicated(keep="first").to_numpy()
    if repeated.any():
        second = int(np.argmax(repeated))
        first = int(np.argmax(pair == pair[second]))
        image_id, name = divmod(int(pair[second]), len(classes))
        raise SubmissionError(
            f"{where} rows {first + 2} and {second + 2} both give image {images[image_id]!r}, "
            f"class {classes[name]!r}; expected one row per image and class"
        )
    counts = np.bincount(pair, minlength=len(images) * len(classes))
    absent = np.flatnonzero(counts == 0)
    if absent.size:
        image_id, name = divmod(int(absent[0]), len(classes))
        raise SubmissionError(
            f"{where} has no row for image {images[image_id]!r}, class {classes[name]!r}; "
            f"expected one row per image and class ({len(images)} x {len(classes)} = "
            f"{counts.size} rows), {absent.size} pair(s) missing"
        )


def _check_every_image(image_code: np.ndarray, images: list[str], where: str) -> None:
    """Instances: every image has at least one row (an empty one when it has no object)."""
    absent = np.flatnonzero(np.bincount(image_code, minlength=len(images)) == 0)
    if absent.size:
        raise SubmissionError(
            f"{where} has no row for image {images[int(absent[0])]!r}; expected at least one "
            f"row per image (an empty EncodedPixels when it has no object), "
            f"{absent.size} image(s) missing"
        )


def _check_bounds(
    rles: list[object],
    image_code: np.ndarray,
    images: list[str],
    n_pixels: np.ndarray,
    shapes: Shapes,
    where: str,
) -> None:
    """Every run ends inside its image; runs are known sorted, so the last run decides."""
    filled = [row for row, value in enumerate(rles) if _is_filled(value)]
    last_ends = np.fromiter(
        (_last_run_end(str(rles[row])) for row in filled), dtype=np.int64, count=len(filled)
    )
    limits = n_pixels[image_code[filled]] if filled else np.empty(0, dtype=np.int64)
    past = np.flatnonzero(last_ends > limits)
    if not past.size:
        return
    row = filled[int(past[0])]
    image_id = images[int(image_code[row])]
    values = np.array(str(rles[row]).split(), dtype=np.int64)
    starts, lengths = values[0::2], values[1::2]
    limit = int(limits[int(past[0])])
    run = int(np.argmax(starts - 1 + lengths > limit))
    shape = shapes[image_id] if isinstance(shapes, Mapping) else shapes
    raise SubmissionError(
        f"{where} row {row + 2}, column {_RLE_COLUMN}: run {run} (start {starts[run]}, "
        f"length {lengths[run]}) ends at pixel {starts[run] - 1 + lengths[run]}, past the "
        f"end of image {image_id!r}: shape {tuple(shape)} has H*W = {limit} pixels"
    )


def _check_no_overlap(
    rles: list[object], image_code: np.ndarray, images: list[str], where: str
) -> None:
    """Instances: objects of one image must not share pixels."""
    starts, lengths, owner = _parse_all_runs(rles)
    run_image = image_code[owner]
    order = np.lexsort((starts, run_image))
    starts, lengths, owner, run_image = (a[order] for a in (starts, lengths, owner, run_image))
    # Sorted by start within an image, any overlap shows between neighbours.
    clash = (run_image[1:] == run_image[:-1]) & (starts[1:] < starts[:-1] + lengths[:-1])
    if clash.any():
        second = int(np.argmax(clash)) + 1
        rows = sorted((int(owner[second - 1]) + 2, int(owner[second]) + 2))
        raise SubmissionError(
            f"{where} rows {rows[0]} and {rows[1]} (image {images[int(run_image[second])]!r}) "
            f"overlap from pixel {starts[second]}; instance masks must not overlap"
        )


def _check_sample_unique(keys: pd.Index, images: np.ndarray, names: np.ndarray) -> None:
    """One sample row per (image, class), so that the sample defines one order."""
    repeated = keys.duplicated(keep="first")
    if repeated.any():
        second = int(np.argmax(repeated))
        first = int(np.argmax(keys == keys[second]))
        raise SubmissionError(
            f"sample rows {first + 2} and {second + 2} both give image {images[second]!r}, "
            f"class {names[second]!r}"
        )


def _is_filled(value: object) -> bool:
    """True for a non-blank RLE string (NaN, None and "" are empty masks)."""
    return isinstance(value, str) and value.strip() != ""


def _last_run_end(text: str) -> int:
    """1-based last pixel of the final run of a valid RLE string."""
    start, length = text.rsplit(None, 2)[-2:]
    return int(start) - 1 + int(length)


def _parse_all_runs(rles: list[object]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Starts, lengths and owning row of every run of already validated RLE strings.

    Valid tokens are >= 1, so a ``0`` joined between strings marks where each ends and
    one parse covers them all.
    """
    filled = [row for row, value in enumerate(rles) if _is_filled(value)]
    if not filled:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    values = np.fromstring(" 0 ".join(str(rles[row]) for row in filled), dtype=np.int64, sep=" ")
    separators = np.flatnonzero(values == 0)
    pieces = np.diff(np.concatenate(([-1], separators, [values.size]))) - 1
    tokens = values[values != 0]
    owner = np.repeat(np.array(filled, dtype=np.int64), pieces // 2)
    return tokens[0::2], tokens[1::2], owner
