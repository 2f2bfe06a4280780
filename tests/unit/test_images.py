"""Image lookup and reading: formats, channel counts, bit depths and bad input."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import images


def write(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), image)
    return path


def test_gray_png_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    image = images.read_image(write(tmp_path / "g.png", gray))
    assert image.shape == (3, 4, 3)
    assert image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], gray)


def test_bgr_png_is_returned_as_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((2, 2, 3), dtype=np.uint8)
    bgr[:, :, 0] = 10  # blue, stored first by OpenCV
    bgr[:, :, 2] = 200  # red
    image = images.read_image(write(tmp_path / "c.png", bgr))
    np.testing.assert_array_equal(image[0, 0], [200, 0, 10])


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    bgra = np.zeros((2, 3, 4), dtype=np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 1, 2, 3, 0
    image = images.read_image(write(tmp_path / "a.png", bgra))
    assert image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image[1, 2], [3, 2, 1])


def test_16_bit_png_is_scaled_to_8_bit(tmp_path: Path) -> None:
    values = np.array([[0, 128, 129, 257], [32896, 65279, 65534, 65535]], dtype=np.uint16)
    image = images.read_image(write(tmp_path / "d.png", values))
    # Rounded division by 257: 128 -> 0.498 -> 0, 129 -> 0.502 -> 1, 65534 -> 254.996 -> 255.
    np.testing.assert_array_equal(image[:, :, 0], [[0, 0, 1, 1], [128, 254, 255, 255]])
    assert image.dtype == np.uint8


def test_16_bit_color_png(tmp_path: Path) -> None:
    bgr = np.zeros((1, 1, 3), dtype=np.uint16)
    bgr[0, 0] = [0, 257 * 100, 65535]
    np.testing.assert_array_equal(
        images.read_image(write(tmp_path / "e.png", bgr))[0, 0], [255, 100, 0]
    )


def test_jpeg_reads_as_rgb_close_to_the_original(tmp_path: Path) -> None:
    bgr = np.zeros((16, 16, 3), dtype=np.uint8)
    bgr[:] = (30, 90, 220)
    path = tmp_path / "f.jpg"
    assert cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    image = images.read_image(path)
    assert image.shape == (16, 16, 3)
    assert np.abs(image.astype(int) - [220, 90, 30]).max() <= 3


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.png' does not exist"):
        images.read_image(tmp_path / "nope.png")
    garbage = tmp_path / "bad.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"bad\.png' \(27 bytes\) could not be decoded"):
        images.read_image(garbage)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\(0 bytes\) could not be decoded"):
        images.read_image(empty)


def test_read_image_size(tmp_path: Path) -> None:
    png = write(tmp_path / "s.png", np.zeros((5, 9, 3), dtype=np.uint8))
    jpg = write(tmp_path / "s.jpg", np.zeros((6, 10, 3), dtype=np.uint8))
    assert images.read_image_size(png) == (5, 9)
    assert images.read_image_size(jpg) == (6, 10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.read_image_size(tmp_path / "missing.png")


def test_resolve_exact_name_then_extensions(tmp_path: Path) -> None:
    write(tmp_path / "0011165.jpg", np.zeros((2, 2, 3), dtype=np.uint8))
    write(tmp_path / "abc.png", np.zeros((2, 2), dtype=np.uint8))
    write(tmp_path / "abc.jpg", np.zeros((2, 2), dtype=np.uint8))
    write(tmp_path / "upper.PNG", np.zeros((2, 2), dtype=np.uint8))
    assert images.resolve_image_path(tmp_path, "0011165.jpg") == tmp_path / "0011165.jpg"
    # .png comes before .jpg in the search order.
    assert images.resolve_image_path(str(tmp_path), "abc") == tmp_path / "abc.png"
    assert images.resolve_image_path(tmp_path, "upper") == tmp_path / "upper.PNG"


def test_resolve_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no image for image_id 'zzz' in folder .*\.png"):
        images.resolve_image_path(tmp_path, "zzz")
    with pytest.raises(FileNotFoundError, match=r"image folder .* does not exist"):
        images.resolve_image_path(tmp_path / "absent", "zzz")


@pytest.mark.parametrize("image_id", ["../x", "a/../../x", "", "/etc/passwd"])
def test_resolve_rejects_ids_outside_the_folder(tmp_path: Path, image_id: str) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    write(tmp_path / "x.png", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="must name a file inside the image folder"):
        images.resolve_image_path(folder, image_id)


def test_resolve_rejects_symlink_escape(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    outside = write(tmp_path / "secret.png", np.zeros((2, 2), dtype=np.uint8))
    (folder / "link.png").symlink_to(outside)
    with pytest.raises(ValueError, match=r"image_id 'link' resolves outside the image folder"):
        images.resolve_image_path(folder, "link")
