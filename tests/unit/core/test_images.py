"""Image lookup and reading: formats, channel counts, bit depths and bad input."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core import images


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


@pytest.mark.parametrize("image_id", ["../x", "a/../../x", "", "/etc/passwd", "sub/x", "a\\x"])
def test_resolve_rejects_ids_outside_the_folder(tmp_path: Path, image_id: str) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    write(tmp_path / "x.png", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="must name a file directly inside the image folder"):
        images.resolve_image_path(folder, image_id)


def test_symlinked_files_and_folders_are_read(tmp_path: Path) -> None:
    """DVC, git-annex and cluster mounts lay data out as symlinks to a store elsewhere."""
    store = tmp_path / "store"
    store.mkdir()
    outside = write(store / "blob.png", np.full((2, 3), 7, dtype=np.uint8))
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "link.png").symlink_to(outside)
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    path = images.resolve_image_path(folder, "link")
    assert images.read_image(path).shape == (2, 3, 3)
    assert images.list_image_files(folder) == ["link.png"]  # a dangling link is no image
    linked = tmp_path / "linked_folder"
    linked.symlink_to(store, target_is_directory=True)
    assert images.list_image_files(linked) == ["blob.png"]
    assert images.resolve_image_path(linked, "blob.png") == linked / "blob.png"


def test_folder_ids_follow_the_csv_spelling(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert images.folder_image_ids(folder, ["a.PNG"]) == ["a.PNG", "b.jpg"]
    assert images.folder_image_ids(folder, ["a"]) == ["a", "b"]
    assert images.folder_image_ids(folder, []) == ["a", "b"]
    (folder / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds both 'a.PNG' and 'a.jpg'.*'a' is ambiguous"):
        images.folder_image_ids(folder, ["a"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.folder_image_ids(tmp_path / "absent", ["a"])


def odd_channel_images(folder: Path) -> dict[str, str]:
    """Files of channel counts foldseg does not read as RGB, by name, with the words that
    their refusal uses: gray+alpha (PNG and TIFF), 4 bands that are not RGBA, 5 bands."""
    from PIL import Image

    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 9, 2), dtype=np.uint8), "LA").save(folder / "la.png")
    for name, bands, dtype in (("la.tif", 2, np.uint8), ("b4.tif", 4, np.uint8),
                               ("b5.tif", 5, np.uint16)):  # fmt: skip
        array = rng.integers(0, 200, (8, 9, bands)).astype(dtype)
        tifffile.imwrite(folder / name, array, photometric="minisblack", planarconfig="contig")
    return {
        "la.png": "2 channels (gray and alpha)",
        "la.tif": "2 channels (gray and alpha, or 2 bands)",
        "b4.tif": "4 bands that are not RGBA",
        "b5.tif": "5 channels",
    }


def test_other_channel_counts_are_refused_from_the_files_header(tmp_path: Path) -> None:
    # OpenCV alone would read the 2- and 4-band TIFFs as gray and fail on 5 bands as
    # "corrupt"; the header's own count is what decides.
    for name, words in odd_channel_images(tmp_path).items():
        with pytest.raises(ValueError) as error:
            images.read_image(tmp_path / name)
        assert str(error.value) == (
            f"image file '{tmp_path / name}' has {words}; expected 1 (gray), 3 (RGB), "
            "4 (RGBA) channels, the channel counts read as the model's RGB input"
        )


def test_rgb_and_rgba_tiffs_and_a_narrower_rule(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert images.read_image(tmp_path / "rgba.tif")[0, 0].tolist() == [200, 0, 0]
    gray = write(tmp_path / "g.jpg", np.full((4, 5), 70, dtype=np.uint8))
    assert images.read_image(gray).shape == (4, 5, 3)
    with pytest.raises(ValueError, match=r"g\.jpg' has 1 channels; expected 3 \(RGB\) channels"):
        images.read_image(gray, channels=(3,))
