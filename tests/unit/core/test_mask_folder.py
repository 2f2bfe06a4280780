"""Mask folders: each format read into the canonical table, written back, and refused
when bad (the file named); hand-made masks of a few pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core import rle
from pipeline.core.mask_folder import MaskOptions, read_mask_folder, write_mask_folder

SIZES = {"a": (4, 5), "b": (4, 5)}


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def masks_of(folder: Path, options: MaskOptions, sizes: dict = SIZES) -> dict:
    read = read_mask_folder(folder, sizes, options)
    table = read.masks.table
    return {
        "format": read.mask_format,
        "classes": read.masks.classes,
        "masks": {
            (row.image_id, row.class_name): rle.decode(row.rle, sizes[row.image_id])
            for row in table.itertuples()
        },
        "void": {k: rle.decode(v, sizes[k]) for k, v in read.void.items()},
    }


def indexed_arrays() -> dict[str, np.ndarray]:
    a = np.zeros((4, 5), np.uint8)
    a[0, :2] = 1
    a[1, 3] = 2
    a[3, 4] = 255
    b = np.zeros((4, 5), np.uint8)
    b[2, 2] = 2
    return {"a": a, "b": b}


def test_binary_png_gif_tiff_bmp_any_depth(tmp_path: Path) -> None:
    mask = np.zeros((4, 5), np.uint8)
    mask[1, 1:3] = 255
    save(tmp_path / "a.gif", mask)
    wide = (mask.astype(np.uint16) // 255) * 65535
    Image.fromarray(wide).save(tmp_path / "b.tif")
    got = masks_of(tmp_path, MaskOptions(instance_class="cell"))
    assert got["format"] == "binary" and got["classes"] == ["cell"]
    assert got["masks"][("a", "cell")].sum() == 2 and got["masks"][("b", "cell")][1, 2] == 1
    other = tmp_path / "bmp"
    other.mkdir()
    save(other / "a.bmp", (mask > 0).astype(np.uint8))
    save(other / "b.png", np.zeros((4, 5), np.uint8))
    got = masks_of(other, MaskOptions(mask_format="binary", classes=["x"]))
    assert got["masks"][("a", "x")].tolist() == (mask > 0).astype(np.uint8).tolist()
    assert got["masks"][("b", "x")].sum() == 0


def test_per_class_missing_file_is_empty(tmp_path: Path) -> None:
    one = np.zeros((4, 5), np.uint8)
    one[0, 0] = 1
    save(tmp_path / "a_sky.png", one * 255)
    save(tmp_path / "b_road.png", one)
    got = masks_of(tmp_path, MaskOptions())
    assert got["format"] == "per_class" and got["classes"] == ["road", "sky"]
    assert got["masks"][("a", "sky")][0, 0] == 1 and got["masks"][("a", "road")].sum() == 0
    assert got["masks"][("b", "road")][0, 0] == 1


def test_indexed_with_void_and_default_map(tmp_path: Path) -> None:
    for name, array in indexed_arrays().items():
        save(tmp_path / f"{name}.png", array)
    got = masks_of(tmp_path, MaskOptions(classes=["p", "q"], ignore_index=255))
    assert got["format"] == "indexed" and got["classes"] == ["p", "q"]
    assert got["masks"][("a", "p")].sum() == 2 and got["masks"][("a", "q")][1, 3] == 1
    assert got["masks"][("b", "q")][2, 2] == 1
    assert got["void"]["a"][3, 4] == 1 and got["void"]["b"].sum() == 0
    # Without a map, every value found names its class.
    got = masks_of(tmp_path, MaskOptions(ignore_index=255))
    assert got["classes"] == ["1", "2"]


def test_indexed_palette_png_uses_its_indices(tmp_path: Path) -> None:
    for name, array in indexed_arrays().items():
        image = Image.fromarray(array, mode="L").convert("P")
        image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
        image.save(tmp_path / f"{name}.png")
    got = masks_of(
        tmp_path, MaskOptions(mask_format="indexed", class_map={"r": 1, "g": 2}, ignore_index=255)
    )
    assert got["masks"][("a", "g")][1, 3] == 1


def test_palette_rgb(tmp_path: Path) -> None:
    colours = {"sky": (0, 0, 255), "road": (128, 64, 128)}
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[0, 0] = colours["sky"]
    rgb[1, 1] = colours["road"]
    rgb[2, 2] = (255, 255, 255)
    save(tmp_path / "a.png", rgb)
    save(tmp_path / "b.png", np.zeros((4, 5, 3), np.uint8))
    options = MaskOptions(palette=colours, ignore_color=[255, 255, 255])
    got = masks_of(tmp_path, options)
    assert got["format"] == "palette" and got["classes"] == ["sky", "road"]
    assert got["masks"][("a", "road")][1, 1] == 1 and got["void"]["a"][2, 2] == 1


@pytest.mark.parametrize("mask_format", ["binary", "per_class", "indexed", "palette"])
def test_write_then_read_round_trip(tmp_path: Path, mask_format: str) -> None:
    import pandas as pd

    classes = ["c"] if mask_format == "binary" else ["c", "d"]
    p = np.zeros((4, 5), np.uint8)
    p[0, 1:4] = 1
    q = np.zeros((4, 5), np.uint8)
    q[3, 0] = 1
    rows = [("a", "c", rle.encode(p)), ("b", "c", "")]
    if len(classes) == 2:
        rows += [("a", "d", rle.encode(q)), ("b", "d", rle.encode(q))]
    table = pd.DataFrame(rows, columns=["image_id", "class_name", "rle"])
    options = MaskOptions(
        mask_format=mask_format,
        classes=classes,
        palette={"c": [10, 20, 30], "d": [40, 50, 60]} if mask_format == "palette" else None,
    )
    write_mask_folder(table, classes, SIZES, tmp_path, mask_format, options)
    got = read_mask_folder(tmp_path, SIZES, options).masks
    merged = got.table.merge(table, on=["image_id", "class_name"], how="left").fillna("")
    assert got.classes == classes
    assert (merged["rle_x"] == merged["rle_y"]).all()


# Bad input: each names the file (or key) and what was expected.


def test_size_differs_from_image(tmp_path: Path) -> None:
    save(tmp_path / "a.png", np.zeros((4, 5), np.uint8))
    save(tmp_path / "b.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"b\.png.*5x5.*image is 4x5"):
        read_mask_folder(tmp_path, SIZES, MaskOptions())


def test_mask_without_image(tmp_path: Path) -> None:
    for name in ("a", "b", "zz"):
        save(tmp_path / f"{name}.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"zz\.png.*names no image"):
        read_mask_folder(tmp_path, SIZES, MaskOptions())


def test_image_without_mask(tmp_path: Path) -> None:
    save(tmp_path / "a.png", np.ones((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"image 'b'.*has no mask"):
        read_mask_folder(tmp_path, SIZES, MaskOptions(mask_format="binary"))


def test_class_id_not_in_map(tmp_path: Path) -> None:
    for name, array in indexed_arrays().items():
        save(tmp_path / f"{name}.png", array)
    with pytest.raises(ValueError, match=r"a\.png.*pixel value 2"):
        read_mask_folder(tmp_path, SIZES, MaskOptions(class_map={"p": 1}, ignore_index=255))


def test_palette_colour_not_in_map(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    save(tmp_path / "a.png", rgb)
    save(tmp_path / "b.png", rgb)
    with pytest.raises(ValueError, match=r"a\.png.*colour \[1, 2, 3\]"):
        read_mask_folder(tmp_path, SIZES, MaskOptions(palette={"sky": [0, 0, 255]}))


def test_ignore_index_is_a_class(tmp_path: Path) -> None:
    for name, array in indexed_arrays().items():
        save(tmp_path / f"{name}.png", array)
    with pytest.raises(ValueError, match=r"ignore_index 2 is also the value of class 'q'"):
        read_mask_folder(tmp_path, SIZES, MaskOptions(classes=["p", "q"], ignore_index=2))


def test_mixed_gray_and_colour(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[0, 0] = (0, 0, 255)
    save(tmp_path / "a.png", rgb)
    save(tmp_path / "b.png", np.ones((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"mixes formats.*a\.png.*b\.png"):
        read_mask_folder(tmp_path, SIZES, MaskOptions())


def test_mixed_naming(tmp_path: Path) -> None:
    save(tmp_path / "a.png", np.ones((4, 5), np.uint8))
    save(tmp_path / "b_sky.png", np.ones((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"mixes formats.*a\.png.*b_sky\.png"):
        read_mask_folder(tmp_path, SIZES, MaskOptions())


def test_binary_with_three_values(tmp_path: Path) -> None:
    for name, array in indexed_arrays().items():
        save(tmp_path / f"{name}.png", array)
    with pytest.raises(ValueError, match=r"a\.png.*values \[0, 1, 2, 255\].*indexed"):
        read_mask_folder(tmp_path, SIZES, MaskOptions(mask_format="binary"))
