"""Finding and reading the images of a data set as RGB uint8 arrays."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.core.commands import command_line

# Tried in this order when an image id has no extension (DSB 2018) or names a file
# without one; upper-case variants follow so that case-sensitive file systems match.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# How an image is resized to the network's input, in training, prediction and bundles
# alike (``resize_image``): a cv2 interpolation, by name for the bundle's manifest.
IMAGE_RESIZE = "INTER_AREA"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The channel counts an image file may have: gray, RGB and RGBA, each read as the
# networks' RGB (alpha dropped). Training and prediction read with the same rule and a
# bundle's manifest records it (``input.image_channels``); a file of another count (gray
# plus alpha, a multi-band TIFF, a 4-band TIFF that is not RGBA) is refused, not guessed.
IMAGE_CHANNELS: tuple[int, ...] = (1, 3, 4)
# PNG colour type -> channels (a palette is RGB); TIFF tags and their RGB photometric.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_TIFF_SAMPLES, _TIFF_PHOTOMETRIC, _TIFF_RGB = 277, 262, 2


def check_image_id(image_id: str, folder: str | Path) -> None:
    """Refuse an id that could leave its folder: empty, absolute, ``..`` or a separator.

    The guard is on the id, not on where the file lives: a folder of symlinks (DVC,
    git-annex, cluster data mounts) points elsewhere by design.

    Raises:
        ValueError: naming the id and the folder.
    """
    if (
        not image_id
        or Path(image_id).is_absolute()
        or ".." in Path(image_id).parts
        or "/" in image_id
        or "\\" in image_id
    ):
        raise ValueError(
            f"image_id must name a file directly inside the image folder {str(folder)!r} "
            f"(no path separator, no '..'); got {image_id!r}"
        )


def resolve_image_path(folder: str | Path, image_id: str) -> Path:
    """Find the file of an image id inside a folder.

    ``folder / image_id`` is used when it is a file; otherwise ``image_id`` followed by
    each of ``IMAGE_EXTENSIONS`` (lower case, then upper case), the first that exists.
    Symlinked files and folders are followed.

    Args:
        folder: the image folder.
        image_id: the CSV's image id, e.g. ``"0011165.jpg"`` or a bare DSB hash.

    Returns:
        The path of the image file, inside ``folder``.

    Raises:
        ValueError: ``image_id`` is empty, absolute, contains ``..`` or a separator.
        FileNotFoundError: ``folder`` does not exist or no candidate file exists.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    check_image_id(image_id, folder)
    extensions = IMAGE_EXTENSIONS + tuple(ext.upper() for ext in IMAGE_EXTENSIONS)
    candidates = [folder / image_id] + [folder / (image_id + ext) for ext in extensions]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no image for image_id {image_id!r} in folder {str(folder)!r}; tried the id "
        f"itself and the extensions {', '.join(IMAGE_EXTENSIONS)} (any case)"
    )


def missing_images(folder: str | Path, image_ids: Iterable[str]) -> list[str]:
    """The ids among ``image_ids`` that have no file in ``folder`` (``resolve_image_path``),
    in their order."""
    missing = []
    for image_id in image_ids:
        try:
            resolve_image_path(folder, image_id)
        except FileNotFoundError:
            missing.append(image_id)
    return missing


def list_image_files(folder: str | Path) -> list[str]:
    """Names of the image files directly in ``folder`` (``IMAGE_EXTENSIONS``, any case),
    sorted; symlinks to files count.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    suffixes = {ext.lower() for ext in IMAGE_EXTENSIONS}
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())


def folder_image_ids(folder: str | Path, csv_ids: Sequence[str]) -> list[str]:
    """The image ids of a data set's folder, spelled as its CSV spells them.

    A CSV names images by file name (``0011165.jpg``: Clouds, Severstal) or by bare
    stem (DSB 2018's hashes). When any CSV id ends in an image extension the folder's
    file names are the ids, else their stems.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: two files share a stem (``a.png`` and ``a.jpg``) under stem ids.
    """
    names = list_image_files(folder)
    suffixes = {ext.lower() for ext in IMAGE_EXTENSIONS}
    if any(Path(image_id).suffix.lower() in suffixes for image_id in csv_ids):
        return names
    stems: dict[str, str] = {}
    for name in names:
        stem = Path(name).stem
        if stem in stems:
            raise ValueError(
                f"image folder {str(folder)!r} holds both {stems[stem]!r} and {name!r}: "
                f"the CSV names images without extension, so image_id {stem!r} is ambiguous"
            )
        stems[stem] = name
    return sorted(stems)


def files_fingerprint(folder: str | Path, image_ids: Sequence[str]) -> str:
    """A hash of the image files of ``image_ids`` in ``folder``: each resolved file's
    name, size and modification time (symlinks followed). Changes when an image is
    added, removed, renamed or rewritten."""
    digest = hashlib.sha256()
    for image_id in image_ids:
        stat = resolve_image_path(folder, image_id).stat()
        digest.update(f"{image_id}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def read_image(path: str | Path, channels: Sequence[int] = IMAGE_CHANNELS) -> np.ndarray:
    """Read an image file as RGB.

    Gray, RGB and RGBA files of 8 or 16 bits are accepted; alpha is dropped and 16-bit
    values are scaled linearly to 8 bits (65535 -> 255). EXIF orientation is ignored,
    so pixels keep the grid the masks were drawn on. The channel count is the file's
    own (its PNG or TIFF header; OpenCV would silently turn a gray-plus-alpha TIFF into
    gray and a 4-band TIFF into its first band).

    Args:
        path: a JPEG, PNG, TIFF or BMP file.
        channels: the channel counts accepted (a bundle's manifest records them).

    Returns:
        (H, W, 3) uint8 RGB image.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded, or has an unsupported dtype or
            channel count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    # imdecode over np.fromfile also works for non-ASCII paths, unlike cv2.imread.
    data = np.fromfile(path, dtype=np.uint8)
    declared = file_channels(data.tobytes())
    if declared is not None and declared[0] not in channels:
        raise ValueError(
            f"image file {str(path)!r} has {declared[1]}; expected "
            f"{_channel_words(channels)}, the channel counts read as the model's RGB input"
        )
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ValueError(
            f"image file {str(path)!r} ({data.size} bytes) could not be decoded: "
            "not a supported image format, or corrupt"
        )
    return _to_rgb_uint8(image, path, channels)


def file_channels(data: bytes) -> tuple[int, str] | None:
    """The channel count a PNG or TIFF file declares in its header, and its words
    (``(2, "2 channels (gray and alpha)")``); 0 for a TIFF whose 4 bands are not RGBA;
    None for other formats (JPEG, BMP: OpenCV decodes them as they are)."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 26:
        count = _PNG_CHANNELS.get(data[25])
        if count is None:
            return None
        return count, f"{count} channel{'s' * (count > 1)}" + (" (gray and alpha)" * (count == 2))
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        tags = _tiff_tags(data, "<" if data[:2] == b"II" else ">")
        samples = tags.get(_TIFF_SAMPLES, 1)
        if samples == 4 and tags.get(_TIFF_PHOTOMETRIC) != _TIFF_RGB:
            return 0, "4 bands that are not RGBA"
        if samples == 2:
            return 2, "2 channels (gray and alpha, or 2 bands)"
        return samples, f"{samples} channel{'s' * (samples > 1)}"
    return None


def _tiff_tags(data: bytes, order: str) -> dict[int, int]:
    """The short integer tags of a classic TIFF's first directory (empty when damaged)."""
    try:
        (offset,) = struct.unpack_from(f"{order}I", data, 4)
        (count,) = struct.unpack_from(f"{order}H", data, offset)
        tags = {}
        for i in range(count):
            tag, kind, n = struct.unpack_from(f"{order}HHI", data, offset + 2 + 12 * i)
            if n == 1 and kind in (3, 4):  # SHORT or LONG, stored in the entry itself
                fmt = f"{order}H" if kind == 3 else f"{order}I"
                tags[tag] = struct.unpack_from(fmt, data, offset + 10 + 12 * i)[0]
        return tags
    except struct.error:
        return {}


def _channel_words(channels: Sequence[int]) -> str:
    words = {1: "1 (gray)", 3: "3 (RGB)", 4: "4 (RGBA)"}
    return ", ".join(words.get(c, str(c)) for c in channels) + " channels"


def read_image_size(path: str | Path) -> tuple[int, int]:
    """Size of an image file, from the header for PNG and by decoding otherwise.

    Args:
        path: an image file readable by ``read_image``.

    Returns:
        ``(H, W)`` in pixels.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    with path.open("rb") as handle:
        header = handle.read(24)
    # PNG: signature, IHDR chunk length and type, then big-endian width and height.
    if header[:8] == _PNG_SIGNATURE and header[12:16] == b"IHDR":
        width, height = struct.unpack(">II", header[16:24])
        return int(height), int(width)
    height, width = read_image(path).shape[:2]
    return height, width


def _to_rgb_uint8(
    image: np.ndarray, path: Path, accepted: Sequence[int] = IMAGE_CHANNELS
) -> np.ndarray:
    """Convert a decoded OpenCV image (BGR order, any channel count) to RGB uint8."""
    if image.dtype == np.uint16:
        # Rounded division by 257 maps 0..65535 exactly onto 0..255.
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(
            f"image file {str(path)!r} has pixel type {image.dtype}; expected 8-bit or "
            "16-bit unsigned integers"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in accepted or channels not in IMAGE_CHANNELS:
        raise ValueError(
            f"image file {str(path)!r} has {channels} channels; expected {_channel_words(accepted)}"
        )
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)


def cache_path(cache_dir: str | Path, name: str, size: Sequence[int]) -> Path:
    """``cache_dir/<name>_<H>x<W>``: the resized-image cache of one image set and size."""
    return Path(cache_dir) / f"{name}_{int(size[0])}x{int(size[1])}"


def read_original_sizes(cache_directory: str | Path) -> dict[str, tuple[int, int]]:
    """image_id -> (H, W) before resizing, from a cache's ``index.csv``."""
    index = Path(cache_directory) / "index.csv"
    if not index.is_file():
        raise FileNotFoundError(
            f"image cache index {index} not found; train a fold first ({command_line('train')})"
        )
    frame = pd.read_csv(index, dtype={"image_id": str}, keep_default_na=False)
    return {
        image_id: (int(h), int(w))
        for image_id, h, w in frame[["image_id", "height", "width"]].itertuples(index=False)
    }


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``image`` (H, W, 3) at ``size`` [height, width], resized as every network input is
    (``IMAGE_RESIZE``)."""
    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=getattr(cv2, IMAGE_RESIZE))
