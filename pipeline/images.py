"""Finding and reading the images of a data set as RGB uint8 arrays."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

# Tried in this order when an image id has no extension (DSB 2018) or names a file
# without one; upper-case variants follow so that case-sensitive file systems match.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def resolve_image_path(folder: str | Path, image_id: str) -> Path:
    """Find the file of an image id inside a folder.

    ``folder / image_id`` is used when it is a file; otherwise ``image_id`` followed by
    each of ``IMAGE_EXTENSIONS`` (lower case, then upper case), the first that exists.

    Args:
        folder: the image folder.
        image_id: the CSV's image id, e.g. ``"0011165.jpg"`` or a bare DSB hash.

    Returns:
        The path of the image file, inside ``folder``.

    Raises:
        ValueError: ``image_id`` is empty, absolute, contains ``..`` or resolves
            outside ``folder`` (including through a symlink).
        FileNotFoundError: ``folder`` does not exist or no candidate file exists.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    relative = Path(image_id)
    if not image_id or relative.is_absolute() or ".." in relative.parts:
        raise ValueError(
            f"image_id must name a file inside the image folder {str(folder)!r}; got {image_id!r}"
        )
    extensions = IMAGE_EXTENSIONS + tuple(ext.upper() for ext in IMAGE_EXTENSIONS)
    candidates = [folder / image_id] + [folder / (image_id + ext) for ext in extensions]
    root = folder.resolve()
    for candidate in candidates:
        if candidate.is_file():
            if not candidate.resolve().is_relative_to(root):
                raise ValueError(
                    f"image_id {image_id!r} resolves outside the image folder "
                    f"{str(folder)!r} (to {str(candidate.resolve())!r})"
                )
            return candidate
    raise FileNotFoundError(
        f"no image for image_id {image_id!r} in folder {str(folder)!r}; tried the id "
        f"itself and the extensions {', '.join(IMAGE_EXTENSIONS)} (any case)"
    )


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Gray, RGB and RGBA files of 8 or 16 bits are accepted; alpha is dropped and 16-bit
    values are scaled linearly to 8 bits (65535 -> 255). EXIF orientation is ignored,
    so pixels keep the grid the masks were drawn on.

    Args:
        path: a JPEG, PNG, TIFF or BMP file.

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
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ValueError(
            f"image file {str(path)!r} ({data.size} bytes) could not be decoded: "
            "not a supported image format, or corrupt"
        )
    return _to_rgb_uint8(image, path)


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


def _to_rgb_uint8(image: np.ndarray, path: Path) -> np.ndarray:
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
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ValueError(f"image file {str(path)!r} has {channels} channels; expected 1, 3 or 4")


def cache_path(cache_dir: str | Path, name: str, size: Sequence[int]) -> Path:
    """``cache_dir/<name>_<H>x<W>``: the resized-image cache of one image set and size."""
    return Path(cache_dir) / f"{name}_{int(size[0])}x{int(size[1])}"


def read_original_sizes(cache_directory: str | Path) -> dict[str, tuple[int, int]]:
    """image_id -> (H, W) before resizing, from a cache's ``index.csv``."""
    index = Path(cache_directory) / "index.csv"
    if not index.is_file():
        raise FileNotFoundError(
            f"image cache index {index} not found; train a fold first (python -m pipeline.train)"
        )
    frame = pd.read_csv(index, dtype={"image_id": str}, keep_default_na=False)
    return {
        image_id: (int(h), int(w))
        for image_id, h, w in frame[["image_id", "height", "width"]].itertuples(index=False)
    }
