"""Tests of the embedded demo data generator (pipeline.make_demo_data)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from pipeline.core.demo_data import CLASSES, draw_image_ids, draw_sample, make_image_rng
from pipeline.core.demo_scenes import FREQUENT_CLASSES, SCENE_CLASSES, draw_scene
from pipeline.core.mask_csv import read_masks
from pipeline.core.rle import decode
from pipeline.make_demo_data import main, make_demo_data

TINY = {
    "n_train": 12,
    "n_test": 4,
    "height": 48,
    "width": 72,
    "truth_size": (24, 36),
    "seed": 7,
}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    return make_demo_data(out, **TINY)


def regenerated_masks(split: str, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """(4, H, W) masks of image ``index`` drawn again, optionally resized to ``size``."""
    rng = make_image_rng(TINY["seed"], split, index)
    _, masks = draw_sample(rng, TINY["height"], TINY["width"])
    stack = [masks[name] for name in CLASSES]
    if size is not None:
        stack = [cv2.resize(m, size[::-1], interpolation=cv2.INTER_NEAREST) for m in stack]
    return np.stack(stack)


def decoded_masks(table: pd.DataFrame, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    rows = table[table["image_id"] == image_id].set_index("class_name")["rle"]
    return np.stack([decode(rows[name], shape) for name in CLASSES])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# draw_sample


def test_draw_sample_shapes_dtypes_and_boxes() -> None:
    for index in range(30):
        image, masks = draw_sample(np.random.default_rng(index), 60, 90)
        assert image.shape == (60, 90, 3) and image.dtype == np.uint8
        assert list(masks) == list(CLASSES)
        present = 0
        for mask in masks.values():
            assert mask.shape == (60, 90) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 1}
            if mask.any():
                present += 1
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                # A union of boxes whose sides are >= 20% of the image's.
                assert rows.size >= round(0.2 * 60) and cols.size >= round(0.2 * 90)
        assert 1 <= present <= 4


def test_draw_sample_is_deterministic_per_generator() -> None:
    first = draw_sample(make_image_rng(3, "train", 5), 48, 72)
    second = draw_sample(make_image_rng(3, "train", 5), 48, 72)
    other = draw_sample(make_image_rng(3, "test", 5), 48, 72)
    np.testing.assert_array_equal(first[0], second[0])
    for name in CLASSES:
        np.testing.assert_array_equal(first[1][name], second[1][name])
    assert not np.array_equal(first[0], other[0])


def test_every_class_is_absent_from_a_good_share_of_images() -> None:
    present = np.array(
        [
            [mask.any() for mask in draw_sample(make_image_rng(0, "train", i), 32, 48)[1].values()]
            for i in range(60)
        ]
    )
    absent = 1 - present.mean(axis=0)
    assert ((absent >= 0.25) & (absent <= 0.65)).all(), dict(zip(CLASSES, absent, strict=True))
    assert (present.sum(axis=1) >= 1).all()


def pixel_features(image: np.ndarray) -> np.ndarray:
    """Colour plus local structure-tensor energy of the image downsized 2.5x, per pixel."""
    small = cv2.resize(image, (96, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    gray = small.mean(axis=-1)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1)
    features = [small[..., c] for c in range(3)]
    for size in (5, 9):
        features += [cv2.blur(a, (size, size)) for a in (gx * gx, gy * gy, gx * gy)]
        features.append(cv2.blur(gray * gray, (size, size)) - cv2.blur(gray, (size, size)) ** 2)
    return np.stack(features, axis=-1).reshape(-1, len(features))


def labelled_pixels(split: str, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels (0 = background, k = class k) of single-label pixels at 64x96."""
    features, labels = [], []
    for index in range(n_images):
        image, masks = draw_sample(make_image_rng(1, split, index), 160, 240)
        stack = np.stack(
            [cv2.resize(masks[n], (96, 64), interpolation=cv2.INTER_NEAREST) for n in CLASSES]
        ).reshape(len(CLASSES), -1)
        single = stack.sum(axis=0) <= 1
        label = np.where(stack.any(axis=0), stack.argmax(axis=0) + 1, 0)
        features.append(pixel_features(image)[single])
        labels.append(label[single])
    return np.concatenate(features), np.concatenate(labels)


def test_textures_stay_separable_after_downsizing() -> None:
    # A linear classifier on hand-made local features (no CNN) already separates the
    # classes at the demo's training size (64x96 from 160x240). Measured: per-class
    # recall background 0.99, Fish 0.76, Flower 0.79, Gravel 0.47, Sugar 0.48 (chance 0.2).
    x_train, y_train = labelled_pixels("train", 20)
    x_test, y_test = labelled_pixels("test", 10)
    predicted = LinearDiscriminantAnalysis().fit(x_train, y_train).predict(x_test)
    recalls = [(predicted[y_test == k] == k).mean() for k in range(len(CLASSES) + 1)]
    assert np.mean(recalls) >= 0.6, recalls
    assert min(recalls) >= 0.3, recalls


# draw_image_ids


def test_image_ids_are_clouds_like_unique_and_independent_of_counts() -> None:
    train, test = draw_image_ids(5, 200, 50)
    assert len(set(train + test)) == 250
    assert all(len(i) == 11 and i.endswith(".jpg") and int(i[:7], 16) >= 0 for i in train)
    more_train, more_test = draw_image_ids(5, 300, 60)
    assert more_train[:200] == train and more_test[:50] == test


# make_demo_data on a tiny set


def test_writes_every_file_and_no_temporaries(tiny_set: Path) -> None:
    train_ids, test_ids = draw_image_ids(TINY["seed"], TINY["n_train"], TINY["n_test"])
    assert sorted(p.name for p in (tiny_set / "train_images").iterdir()) == sorted(train_ids)
    assert sorted(p.name for p in (tiny_set / "test_images").iterdir()) == sorted(test_ids)
    for name in ("train.csv", "test_truth.csv", "sample_submission.csv", "demo_meta.json"):
        assert (tiny_set / name).is_file()
    assert not list(tiny_set.rglob("*.tmp"))
    assert (tiny_set / "train.csv").read_text().startswith("Image_Label,EncodedPixels\n")
    meta = json.loads((tiny_set / "demo_meta.json").read_text())
    assert meta["truth_size"] == [24, 36] and meta["seed"] == 7


def test_train_csv_reads_back_to_the_drawn_masks(tiny_set: Path) -> None:
    masks = read_masks(tiny_set / "train.csv")
    assert masks.csv_format == "image_label"
    assert masks.classes == list(CLASSES)
    assert len(masks.table) == TINY["n_train"] * len(CLASSES)
    train_ids, _ = draw_image_ids(TINY["seed"], TINY["n_train"], TINY["n_test"])
    for index, image_id in enumerate(train_ids):
        decoded = decoded_masks(masks.table, image_id, (48, 72))
        np.testing.assert_array_equal(decoded, regenerated_masks("train", index))
        assert 1 <= decoded.any(axis=(1, 2)).sum() <= 4


def test_images_are_the_drawn_rgb_images(tiny_set: Path) -> None:
    train_ids, _ = draw_image_ids(TINY["seed"], TINY["n_train"], TINY["n_test"])
    for index in (0, 5):
        image, _ = draw_sample(make_image_rng(TINY["seed"], "train", index), 48, 72)
        written = cv2.imread(str(tiny_set / "train_images" / train_ids[index]))[..., ::-1]
        assert written.shape == image.shape
        # JPEG quality 95: small differences only, and RGB (not BGR) order.
        assert np.abs(written.astype(int) - image).mean() < 4


def test_test_truth_is_at_the_truth_size(tiny_set: Path) -> None:
    truth = read_masks(tiny_set / "test_truth.csv")
    assert truth.csv_format == "image_label" and truth.classes == list(CLASSES)
    _, test_ids = draw_image_ids(TINY["seed"], TINY["n_train"], TINY["n_test"])
    assert sorted(truth.table["image_id"].unique()) == sorted(test_ids)
    for index, image_id in enumerate(test_ids):
        decoded = decoded_masks(truth.table, image_id, (24, 36))
        np.testing.assert_array_equal(decoded, regenerated_masks("test", index, (24, 36)))
        assert 1 <= decoded.any(axis=(1, 2)).sum() <= 4


def test_sample_submission_is_test_images_by_classes(tiny_set: Path) -> None:
    frame = pd.read_csv(tiny_set / "sample_submission.csv")
    assert list(frame.columns) == ["Image_Label", "EncodedPixels"]
    _, test_ids = draw_image_ids(TINY["seed"], TINY["n_train"], TINY["n_test"])
    expected = [f"{i}_{c}" for i in sorted(test_ids) for c in CLASSES]
    assert frame["Image_Label"].tolist() == expected
    assert (frame["EncodedPixels"] == "1 1").all()
    assert read_masks(tiny_set / "sample_submission.csv").classes == list(CLASSES)


def test_same_seed_gives_identical_bytes(tmp_path: Path, tiny_set: Path) -> None:
    again = make_demo_data(tmp_path / "again", **TINY)
    assert snapshot(again) == snapshot(tiny_set)
    other = make_demo_data(tmp_path / "other", **{**TINY, "seed": 8})
    assert (other / "train.csv").read_bytes() != (tiny_set / "train.csv").read_bytes()


@pytest.mark.slow
def test_worker_processes_give_identical_bytes(tmp_path: Path, tiny_set: Path) -> None:
    parallel = make_demo_data(tmp_path / "parallel", **TINY, workers=2)
    assert snapshot(parallel) == snapshot(tiny_set)


def test_second_run_is_a_no_op(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = make_demo_data(tmp_path / "demo", **TINY)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with caplog.at_level(logging.INFO, logger="pipeline.make_demo_data"):
        make_demo_data(out, **TINY)
    assert "already present" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_other_parameters_need_force(tmp_path: Path) -> None:
    out = make_demo_data(tmp_path / "demo", **TINY)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"other parameters \(n_train: 12 -> 8\).*--force"):
        make_demo_data(out, **{**TINY, "n_train": 8})
    assert snapshot(out) == before
    make_demo_data(out, **{**TINY, "n_train": 8}, force=True)
    assert len(list((out / "train_images").iterdir())) == 8
    assert len(read_masks(out / "train.csv").table) == 8 * len(CLASSES)
    assert json.loads((out / "demo_meta.json").read_text())["n_train"] == 8


def test_interrupted_run_is_regenerated(tmp_path: Path, tiny_set: Path) -> None:
    out = make_demo_data(tmp_path / "demo", **TINY)
    # As if killed before the CSVs were moved into place: images and meta, no train.csv.
    (out / "train.csv").unlink()
    (out / "test_truth.csv").unlink()
    next((out / "train_images").iterdir()).unlink()
    make_demo_data(out, **TINY)
    assert snapshot(out) == snapshot(tiny_set)


def test_refuses_a_train_csv_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "clouds"
    out.mkdir()
    (out / "train.csv").write_text("Image_Label,EncodedPixels\n")
    with pytest.raises(ValueError, match=r"train\.csv exists but .*demo_meta\.json does not"):
        make_demo_data(out, **TINY)
    assert (out / "train.csv").read_text() == "Image_Label,EncodedPixels\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_train": 0}, r"n_train must be an integer >= 1; got 0"),
        ({"height": 8}, r"height must be an integer >= 16; got 8"),
        ({"truth_size": (0, 5)}, r"truth_size must be \(H, W\) with positive integers"),
        ({"seed": -1}, r"seed must be a non-negative integer; got -1"),
        ({"workers": 0}, r"workers must be an integer >= 1; got 0"),
    ],
)
def test_bad_arguments(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_demo_data(tmp_path / "demo", **{**TINY, **change})
    assert not (tmp_path / "demo").exists()


def test_make_image_rng_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'test'\]; got 'val'"):
        make_image_rng(0, "val", 0)


# CLI


def test_cli_writes_then_reports_already_present(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path / "demo"), "--n-train", "6", "--n-test", "2"]
    argv += ["--height", "32", "--width", "48", "--truth-size", "16x24"]
    assert main(argv) == 0
    assert len(read_masks(tmp_path / "demo" / "test_truth.csv").table) == 2 * len(CLASSES)
    assert main(argv) == 0
    assert "demo data in" in capsys.readouterr().out
    assert main([*argv, "--seed", "1"]) == 2


def test_cli_rejects_a_malformed_truth_size(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--truth-size", "80by120"])


# --variant scenes


def test_scenes_have_two_frequent_large_and_two_sparse_small_classes() -> None:
    present, areas = [], []
    for index in range(30):
        _, masks = draw_scene(make_image_rng(5, "train", index), 90, 120)
        present.append([masks[name].any() for name in SCENE_CLASSES])
        areas.append([masks[name].mean() for name in SCENE_CLASSES])
        # The classes never overlap: each pixel is one class or none.
        assert np.stack([masks[name] for name in SCENE_CLASSES]).sum(axis=0).max() <= 1
    share, area = np.mean(present, axis=0), np.mean(areas, axis=0)
    for k, name in enumerate(SCENE_CLASSES):
        if name in FREQUENT_CLASSES:
            assert share[k] >= 0.9 and area[k] > 0.1, (name, share[k], area[k])
        else:
            assert 0.1 <= share[k] <= 0.8 and area[k] < 0.05, (name, share[k], area[k])


def test_scenes_variant_writes_its_classes_and_leaves_the_default_unchanged(
    tmp_path: Path, tiny_set: Path
) -> None:
    out = make_demo_data(tmp_path / "scenes", **TINY, variant="scenes")
    assert read_masks(out / "train.csv").classes == list(SCENE_CLASSES)
    assert read_masks(out / "sample_submission.csv").classes == list(SCENE_CLASSES)
    meta = json.loads((out / "demo_meta.json").read_text())
    assert meta["variant"] == "scenes"
    # The default variant's record names no variant: sets made before variants match.
    assert "variant" not in json.loads((tiny_set / "demo_meta.json").read_text())
    with pytest.raises(ValueError, match=r"other parameters \(.*variant: scenes -> None"):
        make_demo_data(out, **TINY)
    with pytest.raises(ValueError, match=r"variant must be one of \['clouds', 'scenes'\]"):
        make_demo_data(tmp_path / "bad", **TINY, variant="streets")


def test_cli_scenes_variant(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path / "s"), "--variant", "scenes", "--n-train", "3"]
    argv += ["--n-test", "1", "--height", "36", "--width", "48", "--truth-size", "36x48"]
    assert main(argv) == 0
    table = read_masks(tmp_path / "s" / "train.csv").table
    assert sorted(table["class_name"].unique()) == sorted(SCENE_CLASSES)
