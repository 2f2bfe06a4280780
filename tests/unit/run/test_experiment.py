"""The data set is the image folder plus the CSV: Severstal-style sparse rows, missing
images, header-only CSVs, caches keyed by content, symlinked data."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core import rle
from pipeline.core.config import DEFAULT_CONFIG, load_config
from pipeline.run.experiment import data_key, open_experiment

SIZE = (16, 24)
IDS = [f"{i:03d}.jpg" for i in range(6)]


def box(value: int = 1) -> np.ndarray:
    mask = np.zeros(SIZE, dtype=np.uint8)
    mask[2 : 2 + value, 3:9] = 1
    return mask


def severstal_set(root: Path, rows: list[tuple[str, int, str]]) -> Path:
    """Six images on disk; ``rows`` (ImageId, ClassId, RLE) only for defects."""
    images = root / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    for image_id in IDS:
        cv2.imwrite(str(images / image_id), np.full((*SIZE, 3), 90, dtype=np.uint8))
    frame = pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])
    frame.to_csv(root / "train.csv", index=False)
    config = root / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(DEFAULT_CONFIG),
                "experiment": "steel",
                "runs_dir": str(root / "runs"),
                "data": {
                    "train_csv": str(root / "train.csv"),
                    "train_images": str(images),
                    "classes": ["1", "2", "3", "4"],
                    "image_size": [16, 32],
                    "submission_size": None,
                },
                "folds": {"n_splits": 2},
            }
        )
    )
    return config


DEFECTS = [("000.jpg", 1, rle.encode(box(2))), ("001.jpg", 3, rle.encode(box(3)))]


def test_images_without_rows_are_in_the_data_set_with_empty_masks(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.run.experiment")
    exp = open_experiment(load_config(severstal_set(tmp_path, DEFECTS)))
    assert exp.image_ids == IDS  # all six, not the two with rows
    assert len(exp.table) == 6 * 4
    rles = exp.rles()
    assert rles["000.jpg"][0] != "" and rles["001.jpg"][2] != ""
    assert all(r == "" for image_id in IDS[2:] for r in rles[image_id])
    assert set(exp.folds["image_id"]) == set(IDS)  # every image is in the split
    text = caplog.text
    assert "6 images in" in text and "(2 with a mask, 4 without any)" in text
    assert "images per class {'1': 1, '2': 0, '3': 1, '4': 0}" in text
    assert "class(es) ['2', '4'] have no mask in any image" in text  # the warning names them


def test_a_row_whose_image_is_missing_names_the_rows(tmp_path):
    rows = [*DEFECTS, ("gone.jpg", 2, "1 3"), ("also_gone.jpg", 1, "1 3")]
    with pytest.raises(ValueError, match=r"train.csv' row\(s\) 4, 5: 2 image\(s\) not in the "):
        open_experiment(load_config(severstal_set(tmp_path, rows)))
    assert not (tmp_path / "runs" / "steel" / "folds.csv").exists()


def test_a_header_only_csv_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"train.csv' gives no mask for any of the 6 images"):
        open_experiment(load_config(severstal_set(tmp_path, [])))


def test_an_empty_image_folder_is_an_error(tmp_path):
    config = load_config(severstal_set(tmp_path, DEFECTS))
    for path in (tmp_path / "train_images").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="holds no image files"):
        open_experiment(config)


def test_an_edited_rle_changes_the_decoded_masks(tmp_path):
    from pipeline.run.image_cache import build_cache

    config = load_config(severstal_set(tmp_path, DEFECTS))

    def masks() -> np.ndarray:
        exp = open_experiment(config)
        cache = build_cache(
            exp.cache_dir,
            "train",
            Path(config.data.train_images),
            exp.image_ids,
            config.data.image_size,
            exp.rles(),
            masks_key=exp.data_key,
        )
        return np.array(cache.masks)

    before = masks()
    assert before[0, ..., 0].sum() > 0
    frame = pd.read_csv(tmp_path / "train.csv", dtype=str, keep_default_na=False)
    frame.loc[0, "EncodedPixels"] = rle.encode(box(6))  # same file size class, new mask
    frame.to_csv(tmp_path / "train.csv", index=False)
    after = masks()
    assert after[0, ..., 0].sum() > before[0, ..., 0].sum()
    np.testing.assert_array_equal(after[1], before[1])
    # No cache is a pickle: everything read back is JSON, CSV or .npy.
    cache_files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert not [p for p in cache_files if p.suffix in (".pkl", ".pickle")]


def test_the_data_key_follows_content_class_order_and_image_files(tmp_path):
    path = severstal_set(tmp_path, DEFECTS)
    config = load_config(path)
    key = data_key(config, IDS)
    assert data_key(config, IDS) == key  # stable
    reordered = load_config(path, ["data.classes=[4, 3, 2, 1]"])
    assert data_key(reordered, IDS) != key
    image = tmp_path / "train_images" / "003.jpg"
    cv2.imwrite(str(image), np.zeros((*SIZE, 3), dtype=np.uint8))
    assert data_key(config, IDS) != key  # a rewritten image
    key = data_key(config, IDS)
    csv = tmp_path / "train.csv"
    csv.write_text(csv.read_text().replace(",1,", ",2,", 1))  # same size, new bytes
    assert data_key(config, IDS) != key


def test_symlinked_images_and_folders_are_read(tmp_path):
    store = tmp_path / "store"
    config = load_config(severstal_set(store, DEFECTS))
    linked = tmp_path / "linked"
    linked.mkdir()
    for image_id in IDS:  # DVC / git-annex: a folder of links into a content store
        (linked / image_id).symlink_to(store / "train_images" / image_id)
    config = load_config(config.source, [f"data.train_images={linked}"])  # type: ignore[arg-type]
    assert open_experiment(config).image_ids == IDS
    mount = tmp_path / "mount"
    mount.symlink_to(store / "train_images", target_is_directory=True)
    config = load_config(config.source, [f"data.train_images={mount}"])  # type: ignore[arg-type]
    assert open_experiment(config).image_ids == IDS


def test_a_config_that_differs_from_the_trained_one_is_refused(tmp_path, caplog):
    from pipeline.run.fold_records import (
        check_trained_config,
        record_trained_config,
        trained_config_differences,
    )

    path = severstal_set(tmp_path, DEFECTS)
    config = load_config(path)
    check_trained_config(config)  # nothing trained yet: nothing to compare
    record_trained_config(config, config.fold_dir(0))
    record_trained_config(config, config.fold_dir(1, "classifier"))
    assert (config.run_dir / "config.yaml").is_file()
    check_trained_config(load_config(path, ["tta.views=[identity]", "train.lr=0.5"]))
    changed = load_config(path, ["data.image_size=[32, 32]", "classifier.backbone=resnet34"])
    lines = trained_config_differences(changed)
    assert lines[0].startswith("data.image_size: [16, 32] in ") and "fold_0" in lines[0]
    assert any(line.startswith("classifier.backbone: ") for line in lines)
    assert sum("classifier" in line for line in lines) == 2  # its size and backbone
    with pytest.raises(ValueError, match=r"(?s)differs from the one the folds.*--force"):
        check_trained_config(changed)
    check_trained_config(changed, force=True)
    assert "going on (--force)" in caplog.text


def test_a_rejected_fold_number_writes_nothing(tmp_path):
    from pipeline.train import train_fold

    config = load_config(severstal_set(tmp_path, DEFECTS), ["train.lr=0.0123"])
    with pytest.raises(ValueError, match=r"fold must be in \[0, 1\]; got 9"):
        train_fold(config, 9)
    assert not (tmp_path / "runs").exists()


def test_a_key_added_after_training_counts_as_its_default(tmp_path):
    """A fold trained before train.bn_recalibration existed had it off: not a change."""
    import yaml

    from pipeline.core.config import load_config
    from pipeline.run.fold_records import trained_config_differences

    config = load_config(None, [f"runs_dir={tmp_path}", "folds.n_splits=2"])
    fold_dir = config.fold_dir(0)
    fold_dir.mkdir(parents=True)
    recorded = config.to_dict()
    del recorded["train"]["bn_recalibration"]
    (fold_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert trained_config_differences(config) == []
    changed = config.with_overrides(["train.bn_recalibration=true"])
    assert trained_config_differences(changed) == [
        f"train.bn_recalibration: False in {fold_dir / 'config.yaml'}, True now"
    ]
