"""Masks as image files: reading a mask folder into a ``MaskTable``, and writing one back.

Four folder formats (``MASK_FORMATS``), named by ``data.mask_format``:

- ``binary``: one mask per image, ``<stem>.<ext>``, for one class; 0 is background and
  any one other value (1, 255) the class;
- ``per_class``: ``<stem>_<class>.<ext>``, one binary mask per image and class; a missing
  file is an empty mask;
- ``indexed``: one mask per image whose pixel value is the class id (``class_map``),
  0 the background and ``ignore_index`` void; a palette (``P`` mode) file's indices are
  its values;
- ``palette``: one RGB mask per image whose colour is the class (``palette``), black the
  background and ``ignore_color`` void.

PNG, GIF, TIFF and BMP files of any bit depth are read (Pillow). Each mask is checked
against its image's size, and the folder is read once into the canonical table of RLE
strings that the CSV formats give, so every later stage works unchanged. Void pixels are
kept beside the table (``MaskFolder.void``) and count as background in a sigmoid
channel. ``auto`` detects the format from the files' names and contents and refuses a
folder that mixes formats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core import rle as rle_codec
from pipeline.core.formats import MaskTable, _check_names

MaskFormat = Literal["binary", "per_class", "indexed", "palette"]
MASK_FORMATS: tuple[str, ...] = get_args(MaskFormat)
MASK_EXTENSIONS: tuple[str, ...] = (".png", ".gif", ".tif", ".tiff", ".bmp")
# The background of indexed and palette masks: value 0, colour black.
BACKGROUND_VALUE = 0
BACKGROUND_COLOR = (0, 0, 0)
Color = tuple[int, int, int]
_BINARY_ON = {1, 255, 65535}


@dataclass(frozen=True)
class MaskFolder:
    """A mask folder read into the canonical table.

    Attributes:
        masks: the ``MaskTable`` (RLE per image and class, as a CSV gives it).
        mask_format: the folder's format, one of ``MASK_FORMATS`` (detected under auto).
        void: image_id -> RLE of its void pixels (indexed and palette; ``""`` none).
    """

    masks: MaskTable
    mask_format: str
    void: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MaskOptions:
    """How a mask folder is read: ``data.mask_format``, ``data.classes``,
    ``data.class_map``, ``data.palette``, ``data.ignore_index``, ``data.ignore_color``,
    ``data.instance_class`` (the one class of a binary folder when classes is null)."""

    mask_format: str = "auto"
    classes: Sequence[str] | None = None
    class_map: Mapping[str, int] | None = None
    palette: Mapping[str, Sequence[int]] | None = None
    ignore_index: int | None = None
    ignore_color: Sequence[int] | None = None
    instance_class: str = "object"


@dataclass
class _MaskFile:
    """One decoded mask file: ``values`` (H, W) integers, or ``colors`` (H, W, 3) uint8."""

    path: Path
    values: np.ndarray | None
    colors: np.ndarray | None

    @property
    def shape(self) -> tuple[int, int]:
        array = self.values if self.values is not None else self.colors
        assert array is not None
        return int(array.shape[0]), int(array.shape[1])


def list_mask_files(folder: str | Path) -> list[Path]:
    """The mask files directly in ``folder`` (``MASK_EXTENSIONS``, any case), sorted.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"mask folder {str(folder)!r} does not exist")
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in MASK_EXTENSIONS and p.is_file()
    )


def read_mask_file(path: str | Path) -> _MaskFile:
    """Decode a mask file of any bit depth.

    Gray (1, 8, 16, 32-bit) files give their values; palette (``P``) files their indices
    (the class ids of VOC-style sets) and their colours; RGB and RGBA files their colours,
    or their values when every pixel is gray (R = G = B). Alpha is dropped.

    Raises:
        ValueError: the file cannot be decoded, or holds floating-point pixels.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "P":
                indices = np.asarray(image)
                colors = np.asarray(image.convert("RGB"))
                return _MaskFile(path, indices, colors)
            if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA"):
                rgb = np.asarray(image.convert("RGB"))
                if mode in ("LA", "PA") or _is_gray(rgb):
                    return _MaskFile(path, rgb[:, :, 0], None)
                return _MaskFile(path, None, rgb)
            array = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"mask file {str(path)!r} could not be decoded: {exc}") from None
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    if array.dtype.kind not in "iu":
        raise ValueError(
            f"mask file {str(path)!r} has pixel type {array.dtype}; expected integers "
            "(1, 8, 16 or 32 bits)"
        )
    if array.ndim == 3:
        array = array[:, :, 0]
    return _MaskFile(path, array, None)


def _is_gray(rgb: np.ndarray) -> bool:
    return bool((rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all())


def _image_stem(image_id: str) -> str:
    """The stem a mask file of ``image_id`` is named by (``a.jpg`` -> ``a``; ``a`` -> ``a``)."""
    path = Path(image_id)
    return path.stem if path.suffix.lower() in _ALL_IMAGE_SUFFIXES else image_id


_ALL_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif"}


def match_mask_files(
    folder: Path, files: Sequence[Path], image_ids: Sequence[str]
) -> tuple[dict[str, Path], dict[str, dict[str, Path]]]:
    """Sort mask files into one-per-image (``<stem>.<ext>``) and per-class
    (``<stem>_<class>.<ext>``) files.

    Returns:
        (image_id -> file, image_id -> {class -> file}).

    Raises:
        ValueError: a file names no image of the set, or two files give the same mask.
    """
    by_stem = {_image_stem(image_id): image_id for image_id in image_ids}
    single: dict[str, Path] = {}
    per_class: dict[str, dict[str, Path]] = {}
    for path in files:
        stem = path.stem
        if stem in by_stem:
            image_id = by_stem[stem]
            if image_id in single:
                raise ValueError(
                    f"mask folder {str(folder)!r} holds two masks of image {image_id!r}: "
                    f"{single[image_id].name!r} and {path.name!r}; keep one"
                )
            single[image_id] = path
            continue
        owner, name = _split_class(stem, by_stem)
        if owner is None:
            raise ValueError(
                f"mask file {str(path)!r} names no image of the image folder: expected "
                "<image stem>.<ext> or <image stem>_<class>.<ext> of an image"
            )
        classes = per_class.setdefault(owner, {})
        if name in classes:
            raise ValueError(
                f"mask folder {str(folder)!r} holds two masks of image {owner!r}, class "
                f"{name!r}: {classes[name].name!r} and {path.name!r}; keep one"
            )
        classes[name] = path
    return single, per_class


def _split_class(stem: str, by_stem: Mapping[str, str]) -> tuple[str | None, str]:
    """(image_id, class) of ``<image stem>_<class>``, the longest image stem that fits."""
    position = stem.rfind("_")
    while position > 0:
        prefix, name = stem[:position], stem[position + 1 :]
        if prefix in by_stem and name:
            return by_stem[prefix], name
        position = stem.rfind("_", 0, position)
    return None, ""


def read_mask_folder(
    folder: str | Path,
    image_sizes: Mapping[str, tuple[int, int]],
    options: MaskOptions,
    csv_format: str = "image_label",
    image_folder: str | Path = "",
) -> MaskFolder:
    """Read every mask of a folder into the canonical table.

    Args:
        folder: the mask folder.
        image_sizes: image_id -> (H, W) of every image of the data set (its folder's).
        options: how to read it (``MaskOptions``).
        csv_format: the CSV format the table is later written as (submissions).
        image_folder: the image folder, named in messages.

    Returns:
        A ``MaskFolder``: one row per image and class (empty masks ``""``).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: naming the file: a mask of no image, an image without a mask (binary,
            indexed, palette), a size unlike its image's, a value or colour not in the
            map, an ignore value that is also a class, a folder mixing formats, a
            non-binary mask where a binary one is expected.
    """
    folder = Path(folder)
    image_ids = sorted(image_sizes)
    single, per_class = match_mask_files(folder, list_mask_files(folder), image_ids)
    if not single and not per_class:
        raise ValueError(
            f"mask folder {str(folder)!r} holds no mask file ({', '.join(MASK_EXTENSIONS)})"
        )
    mask_format = options.mask_format
    if single and per_class:
        one = next(iter(single.values()))
        other = next(iter(next(iter(per_class.values())).values()))
        raise ValueError(
            f"mask folder {str(folder)!r} mixes formats: {one.name!r} is one mask per image, "
            f"{other.name!r} one mask per image and class; keep one format"
        )
    if per_class:
        if mask_format not in ("auto", "per_class"):
            first = next(iter(next(iter(per_class.values())).values()))
            raise ValueError(
                f"mask file {str(first)!r} is named <image>_<class>, but data.mask_format "
                f"is {mask_format!r}, which names masks <image>.<ext>"
            )
        return _read_per_class(folder, per_class, image_sizes, options, csv_format)
    if mask_format == "per_class":
        first = next(iter(single.values()))
        raise ValueError(
            f"mask file {str(first)!r} is named <image>.<ext>, but data.mask_format is "
            "'per_class', which names masks <image>_<class>.<ext>"
        )
    missing = [image_id for image_id in image_ids if image_id not in single]
    if missing:
        where = f" of {str(image_folder)!r}" if image_folder else ""
        raise ValueError(
            f"image {missing[0]!r}{where} has no mask in {str(folder)!r} ({len(missing)} "
            f"image(s) without one); the {mask_format if mask_format != 'auto' else 'folder'}"
            " format needs one mask file per image"
        )
    files = _MaskFiles({image_id: single[image_id] for image_id in image_ids}, image_sizes)
    if mask_format == "auto":
        mask_format = _detect(folder, files, options)
    if mask_format == "binary":
        return _read_binary(files, options, csv_format)
    if mask_format == "indexed":
        return _read_indexed(files, options, csv_format)
    return _read_palette(files, options, csv_format)


def _checked(mask: _MaskFile, size: tuple[int, int]) -> _MaskFile:
    if mask.shape != tuple(size):
        raise ValueError(
            f"mask file {str(mask.path)!r} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its "
            f"image is {size[0]}x{size[1]}; a mask must have its image's size"
        )
    return mask


class _MaskFiles(Mapping[str, _MaskFile]):
    """image_id -> its mask file, decoded (and checked against its image's size) when
    read, so that a folder of large masks is never in memory at once."""

    def __init__(self, paths: Mapping[str, Path], sizes: Mapping[str, tuple[int, int]]):
        self.paths = dict(paths)
        self.sizes = sizes

    def __getitem__(self, image_id: str) -> _MaskFile:
        return _checked(read_mask_file(self.paths[image_id]), self.sizes[image_id])

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def _detect(folder: Path, files: Mapping[str, _MaskFile], options: MaskOptions) -> str:
    """binary, indexed or palette from the files' contents; a mix is an error."""
    colored: Path | None = None
    gray: Path | None = None
    # Binary: each file 0 and at most one other value, all of them one value or the
    # "full" values of 1, 8 and 16-bit files (1, 255, 65535) that binary masks use.
    values: set[int] = set()
    binary = True
    for mask in files.values():
        if mask.values is None:
            colored = colored or mask.path
        elif mask.values.any():
            gray = gray or mask.path
            own = {int(v) for v in np.unique(mask.values)} - {BACKGROUND_VALUE}
            values.update(own)
            if len(own) > 1 or (len(values) > 1 and not values <= _BINARY_ON):
                binary = False
        if colored is not None and gray is not None:
            raise ValueError(
                f"mask folder {str(folder)!r} mixes formats: {colored.name!r} is a colour "
                f"(palette) mask, {gray.name!r} a gray (binary or indexed) one; keep one"
            )
    if colored is not None or options.palette is not None:
        return "palette"
    if options.class_map is not None or options.ignore_index is not None or not binary:
        return "indexed"
    return "binary"


def _table(rles: Mapping[str, Sequence[str]], classes: Sequence[str], csv_format: str) -> MaskTable:
    rows = [
        (image_id, name, rle)
        for image_id in sorted(rles)
        for name, rle in zip(classes, rles[image_id], strict=True)
    ]
    table = pd.DataFrame(rows, columns=["image_id", "class_name", "rle"], dtype=str)
    return MaskTable(table=table, classes=list(classes), csv_format=csv_format)


def _binary_values(mask: _MaskFile) -> np.ndarray:
    """A binary mask file's foreground, (H, W) bool; more than two values is an error."""
    if mask.values is None:
        raise ValueError(
            f"mask file {str(mask.path)!r} is a colour image; a binary mask is gray with 0 "
            "as background and one other value (1 or 255) as the class"
        )
    present = np.unique(mask.values)
    if len(present) > 2 or (len(present) == 2 and present[0] != BACKGROUND_VALUE):
        raise ValueError(
            f"mask file {str(mask.path)!r} holds the values {present[:6].tolist()}; a binary "
            "mask holds 0 (background) and one other value (1 or 255); index-coded masks "
            "are data.mask_format indexed"
        )
    return np.asarray(mask.values != BACKGROUND_VALUE)


def _read_binary(
    files: Mapping[str, _MaskFile], options: MaskOptions, csv_format: str
) -> MaskFolder:
    if options.classes is None:
        classes = _check_names([options.instance_class], "data.instance_class")
    else:
        classes = _check_names(options.classes, "data.classes")
        if len(classes) != 1:
            raise ValueError(
                f"binary masks hold one class; data.classes names {len(classes)}: {classes}"
            )
    rles = {image_id: [rle_codec.encode(_binary_values(m))] for image_id, m in files.items()}
    return MaskFolder(_table(rles, classes, csv_format), "binary")


def _read_per_class(
    folder: Path,
    per_class: Mapping[str, Mapping[str, Path]],
    image_sizes: Mapping[str, tuple[int, int]],
    options: MaskOptions,
    csv_format: str,
) -> MaskFolder:
    found = sorted({name for names in per_class.values() for name in names})
    if options.classes is None:
        classes = found
    else:
        classes = _check_names(options.classes, "data.classes")
        for names in per_class.values():
            unknown = [name for name in names if name not in classes]
            if unknown:
                raise ValueError(
                    f"mask file {str(names[unknown[0]])!r} names class {unknown[0]!r}, "
                    f"which is not one of data.classes {classes}"
                )
    rles: dict[str, list[str]] = {}
    for image_id in sorted(image_sizes):
        names = per_class.get(image_id, {})
        row = []
        for name in classes:
            path = names.get(name)
            if path is None:
                row.append("")
                continue
            mask = _checked(read_mask_file(path), image_sizes[image_id])
            row.append(rle_codec.encode(_binary_values(mask)))
        rles[image_id] = row
    return MaskFolder(_table(rles, classes, csv_format), "per_class")


def class_values(options: MaskOptions, found: Sequence[int] = ()) -> dict[str, int]:
    """class name -> pixel value of indexed masks.

    ``class_map`` when given (in ``classes`` order when both are given); else
    ``classes[i]`` is ``i + 1``; else every value found other than 0 and
    ``ignore_index``, named by itself.

    Raises:
        ValueError: ``ignore_index`` or the background 0 is also a class's value, two
            classes share a value, or ``classes`` and ``class_map`` disagree.
    """
    if options.class_map is not None:
        mapping = {str(name): int(value) for name, value in options.class_map.items()}
        if options.classes is not None:
            classes = _check_names(options.classes, "data.classes")
            if sorted(classes) != sorted(mapping):
                raise ValueError(
                    f"data.classes {classes} and the classes of data.class_map "
                    f"{sorted(mapping)} differ; name the same classes"
                )
            mapping = {name: mapping[name] for name in classes}
    elif options.classes is not None:
        classes = _check_names(options.classes, "data.classes")
        mapping = {name: i + 1 for i, name in enumerate(classes)}
    else:
        values = sorted({int(v) for v in found} - {BACKGROUND_VALUE} - {options.ignore_index or -1})
        mapping = {str(value): value for value in values}
    _check_values(mapping, options.ignore_index)
    return mapping


def _check_values(mapping: Mapping[str, int], ignore_index: int | None) -> None:
    for name, value in mapping.items():
        if value == ignore_index:
            raise ValueError(
                f"data.ignore_index {ignore_index} is also the value of class {name!r}; "
                "void pixels need a value of their own"
            )
        if value == BACKGROUND_VALUE:
            raise ValueError(
                f"class {name!r} has the value {BACKGROUND_VALUE}, which is the background "
                "of indexed masks; give classes values from 1"
            )
    seen: dict[int, str] = {}
    for name, value in mapping.items():
        if value in seen:
            raise ValueError(f"classes {seen[value]!r} and {name!r} share the value {value}")
        seen[value] = name


def _read_indexed(
    files: Mapping[str, _MaskFile], options: MaskOptions, csv_format: str
) -> MaskFolder:
    found: set[int] = set()
    if options.class_map is None and options.classes is None:
        for mask in files.values():
            if mask.values is None:
                raise ValueError(f"mask file {str(mask.path)!r} is a colour image, not indexed")
            found.update(int(v) for v in np.unique(mask.values))
    mapping = class_values(options, sorted(found))
    if not mapping:
        raise ValueError("indexed masks hold no class value: every pixel is background or void")
    allowed = {*mapping.values(), BACKGROUND_VALUE}
    if options.ignore_index is not None:
        allowed.add(options.ignore_index)
    rles: dict[str, list[str]] = {}
    void: dict[str, str] = {}
    for image_id, mask in files.items():
        if mask.values is None:
            raise ValueError(
                f"mask file {str(mask.path)!r} is a colour image; indexed masks are gray or "
                "palette (P) images whose value is the class id (palette colours: "
                "data.mask_format palette)"
            )
        present = {int(v) for v in np.unique(mask.values)}
        stray = sorted(present - allowed)
        if stray:
            raise ValueError(
                f"mask file {str(mask.path)!r} holds pixel value {stray[0]}, which is not a "
                f"class id of the class map {mapping}, the background {BACKGROUND_VALUE} or "
                f"data.ignore_index ({options.ignore_index})"
            )
        rles[image_id] = [rle_codec.encode(mask.values == value) for value in mapping.values()]
        if options.ignore_index is not None:
            void[image_id] = rle_codec.encode(mask.values == options.ignore_index)
    return MaskFolder(_table(rles, list(mapping), csv_format), "indexed", void)


def class_colors(options: MaskOptions) -> dict[str, Color]:
    """class name -> RGB colour of palette masks (``palette``, in ``classes`` order).

    Raises:
        ValueError: no palette, a colour that is not 3 values in 0..255, black (the
            background) or ``ignore_color`` used by a class, two classes sharing a colour.
    """
    if options.palette is None:
        raise ValueError("palette masks need data.palette (class name -> [R, G, B]); got null")
    mapping: dict[str, Color] = {}
    for name, color in options.palette.items():
        values = tuple(int(v) for v in color)
        if len(values) != 3 or not all(0 <= v <= 255 for v in values):
            raise ValueError(
                f"data.palette class {name!r}: expected [R, G, B] in 0..255; got {color}"
            )
        mapping[str(name)] = (values[0], values[1], values[2])
    if options.classes is not None:
        classes = _check_names(options.classes, "data.classes")
        if sorted(classes) != sorted(mapping):
            raise ValueError(
                f"data.classes {classes} and the classes of data.palette {sorted(mapping)} "
                "differ; name the same classes"
            )
        mapping = {name: mapping[name] for name in classes}
    ignore = tuple(options.ignore_color) if options.ignore_color is not None else None
    seen: dict[Color, str] = {}
    for name, color in mapping.items():
        if color == BACKGROUND_COLOR:
            raise ValueError(f"data.palette class {name!r} is black, the background colour")
        if ignore is not None and color == ignore:
            raise ValueError(
                f"data.ignore_color {list(ignore)} is also the colour of class {name!r}; void "
                "pixels need a colour of their own"
            )
        if color in seen:
            raise ValueError(
                f"data.palette classes {seen[color]!r} and {name!r} share {list(color)}"
            )
        seen[color] = name
    return mapping


def _read_palette(
    files: Mapping[str, _MaskFile], options: MaskOptions, csv_format: str
) -> MaskFolder:
    mapping = class_colors(options)
    ignore = tuple(options.ignore_color) if options.ignore_color is not None else None
    allowed = {*mapping.values(), BACKGROUND_COLOR}
    if ignore is not None:
        allowed.add((ignore[0], ignore[1], ignore[2]))
    rles: dict[str, list[str]] = {}
    void: dict[str, str] = {}
    for image_id, mask in files.items():
        colors = mask.colors
        if colors is None:
            assert mask.values is not None
            if mask.values.any():
                raise ValueError(
                    f"mask file {str(mask.path)!r} is a gray image; palette masks are RGB or "
                    "palette (P) images whose colour is the class"
                )
            colors = np.zeros((*mask.shape, 3), np.uint8)
        packed = _pack(colors)
        present = {_unpack(int(v)) for v in np.unique(packed)}
        stray = sorted(present - allowed)
        if stray:
            raise ValueError(
                f"mask file {str(mask.path)!r} holds the colour {list(stray[0])}, which is not "
                f"a class colour of data.palette { ({k: list(v) for k, v in mapping.items()}) }, "
                f"black (background) or data.ignore_color ({options.ignore_color})"
            )
        rles[image_id] = [rle_codec.encode(packed == _pack_one(c)) for c in mapping.values()]
        if ignore is not None:
            void[image_id] = rle_codec.encode(packed == _pack_one(ignore))
    return MaskFolder(_table(rles, list(mapping), csv_format), "palette", void)


def _pack(colors: np.ndarray) -> np.ndarray:
    colors = colors.astype(np.int64)
    return np.asarray((colors[:, :, 0] << 16) | (colors[:, :, 1] << 8) | colors[:, :, 2])


def _pack_one(color: Sequence[int]) -> int:
    return (int(color[0]) << 16) | (int(color[1]) << 8) | int(color[2])


def _unpack(value: int) -> Color:
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


def write_mask_folder(
    table: pd.DataFrame,
    classes: Sequence[str],
    image_sizes: Mapping[str, tuple[int, int]],
    out: str | Path,
    mask_format: str,
    options: MaskOptions,
    image_name: Callable[[str], str] = _image_stem,
) -> list[Path]:
    """Write the masks of a canonical table as a mask folder, PNG files.

    Args:
        table: columns ``image_id``, ``class_name``, ``rle``.
        classes: the class names in order.
        image_sizes: image_id -> (H, W), for every image of the table.
        out: an existing, empty folder (build it under a temporary name and publish it).
        mask_format: one of ``MASK_FORMATS``.
        options: ``class_map``/``classes`` (indexed) or ``palette`` (palette).
        image_name: the stem a mask of an image id is named by.

    Returns:
        The files written.

    Raises:
        ValueError: one class in a binary folder expected, classes that overlap in an
            indexed or palette folder (one value per pixel), an unknown format.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask format must be one of {list(MASK_FORMATS)}; got {mask_format!r}")
    if mask_format == "binary" and len(classes) != 1:
        raise ValueError(
            f"a binary mask folder holds one class; the masks have {len(classes)}: "
            f"{list(classes)} (use per_class or indexed)"
        )
    values: dict[str, int] = {}
    colors: dict[str, Color] = {}
    if mask_format == "indexed":
        values = class_values(
            MaskOptions(
                classes=None if options.class_map else list(classes),
                class_map=options.class_map,
                ignore_index=options.ignore_index,
            )
        )
        if max(values.values()) > 65535:
            raise ValueError("indexed class values must be at most 65535 for a PNG mask")
    if mask_format == "palette":
        colors = class_colors(options)
    out = Path(out)
    written: list[Path] = []
    grouped = table.groupby("image_id", sort=True)
    for image_id, rows in grouped:
        image_id = str(image_id)
        shape = image_sizes[image_id]
        by_class = dict(zip(rows["class_name"].astype(str), rows["rle"].astype(str), strict=True))
        masks = {name: rle_codec.decode(by_class.get(name, ""), shape) for name in classes}
        stem = image_name(image_id)
        if mask_format == "binary":
            written.append(_write_png(out / f"{stem}.png", masks[classes[0]] * 255))
        elif mask_format == "per_class":
            for name in classes:
                written.append(_write_png(out / f"{stem}_{name}.png", masks[name] * 255))
        else:
            _check_exclusive(image_id, masks)
            if mask_format == "indexed":
                dtype = np.uint8 if max(values.values()) <= 255 else np.uint16
                index = np.zeros(shape, dtype)
                for name, value in values.items():
                    index[masks[name] > 0] = value
                written.append(_write_png(out / f"{stem}.png", index))
            else:
                rgb = np.zeros((*shape, 3), np.uint8)
                for name, color in colors.items():
                    rgb[masks[name] > 0] = color
                written.append(_write_png(out / f"{stem}.png", rgb))
    return written


def _check_exclusive(image_id: str, masks: Mapping[str, np.ndarray]) -> None:
    total = sum(mask.astype(np.int32) for mask in masks.values())
    if isinstance(total, np.ndarray) and (total > 1).any():
        raise ValueError(
            f"image {image_id!r}: classes overlap, so one value per pixel cannot hold them; "
            "write per_class masks instead"
        )


def _write_png(path: Path, array: np.ndarray) -> Path:
    if array.dtype == np.uint16:
        image = Image.fromarray(array)
    else:
        image = Image.fromarray(array.astype(np.uint8))
    image.save(path, format="PNG")
    return path
