"""Mask folders as a data source: ``foldseg convert`` both ways on the tiny generated set,
the same experiment read from the CSV and from the folder (split, table, decoded masks),
and the bad-input cases of a mask folder through the real CLI (exit 2, file named,
nothing written)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import load_config
from pipeline.run.experiment import open_experiment
from pipeline.run.image_cache import training_cache
from tests.conftest import REPO, write_tiny_config


def convert(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.convert", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def mask_copy(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny set's train.csv written as a per_class mask folder by the converter."""
    out = tmp_path_factory.mktemp("masks") / "train_masks"
    config = write_tiny_config(out.parent, tiny_data)
    done = convert("--config", str(config), "--to-masks", str(out))
    assert done.returncode == 0, done.stderr
    return out


def masks_config(tmp_path: Path, tiny_data: Path, masks: Path, **data: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_tiny_config(
        tmp_path, tiny_data, data={"train_csv": None, "masks": str(masks), **data}
    )


def test_csv_and_mask_folder_give_the_same_experiment(
    tmp_path: Path, tiny_data: Path, mask_copy: Path
) -> None:
    assert len(list(mask_copy.glob("*.png"))) == 18 * 4  # every image x class, per_class
    (tmp_path / "csv").mkdir()
    from_csv = load_config(write_tiny_config(tmp_path / "csv", tiny_data))
    from_folder = load_config(masks_config(tmp_path / "folder", tiny_data, mask_copy))
    a, b = open_experiment(from_csv), open_experiment(from_folder)
    assert b.classes == a.classes and b.image_ids == a.image_ids
    assert b.csv_format == a.csv_format == "image_label"  # from the sample submission
    pd.testing.assert_frame_equal(a.table, b.table)
    assert (from_csv.run_dir / "folds.csv").read_bytes() == (
        from_folder.run_dir / "folds.csv"
    ).read_bytes()
    size = from_csv.data.image_size
    masks_a = training_cache(from_csv, a, size).masks
    masks_b = training_cache(from_folder, b, size).masks
    assert masks_a is not None and masks_b is not None and np.array_equal(masks_a, masks_b)
    # And back: the folder written as a CSV is the original CSV.
    back = tmp_path / "back.csv"
    done = convert("--config", str(from_folder.source), "--to-csv", str(back))
    assert done.returncode == 0, done.stderr
    original = pd.read_csv(tiny_data / "train.csv", keep_default_na=False)
    written = pd.read_csv(back, keep_default_na=False)
    pd.testing.assert_frame_equal(
        original.sort_values("Image_Label").reset_index(drop=True), written
    )


def damaged(tmp_path: Path, mask_copy: Path) -> Path:
    copy = tmp_path / "masks"
    shutil.copytree(mask_copy, copy)
    return copy


def refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)


@pytest.mark.slow
def test_bad_mask_folders_exit_2_naming_the_file(
    tmp_path: Path, tiny_data: Path, mask_copy: Path
) -> None:
    first = sorted(mask_copy.glob("*.png"))[0]
    out = tmp_path / "out.csv"

    def run(masks: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        config = masks_config(tmp_path, tiny_data, masks)
        return convert("--config", str(config), *extra, "--to-csv", str(out))

    # A mask whose size differs from its image.
    folder = damaged(tmp_path / "size", mask_copy)
    Image.new("L", (7, 5)).save(folder / first.name)
    refused(run(folder), first.name, "5x7", "image is 64x96")
    # A mask without an image.
    folder = damaged(tmp_path / "orphan", mask_copy)
    shutil.copy(first, folder / "nosuchimage.png")
    refused(run(folder), "nosuchimage.png", "names no image")
    # An image without a mask, in a format that needs one.
    folder = tmp_path / "binary"
    folder.mkdir()
    image_ids = sorted(p.stem for p in (tiny_data / "train_images").iterdir())
    for image_id in image_ids[1:]:
        Image.new("L", (96, 64)).save(folder / f"{image_id}.png")
    Image.new("L", (96, 64), 255).save(folder / f"{image_ids[1]}.png")
    refused(run(folder), image_ids[0], "has no mask")
    # A class id not in the map.
    Image.new("L", (96, 64)).save(folder / f"{image_ids[0]}.png")
    Image.new("L", (96, 64), 7).save(folder / f"{image_ids[2]}.png")
    refused(run(folder, "--set", "data.class_map={a: 1, b: 255}"), f"{image_ids[2]}.png", "7")
    # A palette colour not in the map.
    Image.new("L", (96, 64)).save(folder / f"{image_ids[1]}.png")
    Image.new("RGB", (96, 64), (9, 9, 200)).save(folder / f"{image_ids[2]}.png")
    refused(
        run(folder, "--set", "data.palette={sky: [0, 0, 255]}"),
        f"{image_ids[2]}.png",
        "[9, 9, 200]",
    )
    # A folder mixing formats (a colour mask among gray ones).
    Image.new("L", (96, 64), 255).save(folder / f"{image_ids[1]}.png")
    refused(run(folder), "mixes formats", f"{image_ids[2]}.png")
    # An ignore_index that is also a class.
    refused(
        run(folder, "--set", "data.class_map={a: 1, b: 255}", "--set", "data.ignore_index=255"),
        "data.ignore_index",
        "255",
    )
    # Both sources, or neither.
    refused(run(folder, "--set", f"data.train_csv={tiny_data / 'train.csv'}"), "exactly one")
    assert not out.exists()


DSB = REPO.parent / "shared" / "data" / "dsb2018"


@pytest.mark.slow
@pytest.mark.skipif(not (DSB / "train.csv").is_file(), reason="DSB 2018 is not in ../shared/data")
def test_dsb2018_from_its_csv_and_from_a_mask_folder(tmp_path: Path) -> None:
    """The same split and masks (benchmarks/bench_mask_folder.py trains both)."""
    masks = tmp_path / "masks"
    base = REPO / "configs" / "dsb2018.yaml"
    common = [
        f"runs_dir={tmp_path / 'runs'}",
        f"data.train_images={DSB / 'images'}",
        f"data.test_images={DSB / 'images'}",
    ]
    sets = {
        "csv": [*common, "experiment=csv", f"data.train_csv={DSB / 'train.csv'}"],
        "masks": [*common, "experiment=masks", "data.train_csv=null", f"data.masks={masks}"],
    }
    args = [part for value in sets["csv"] for part in ("--set", value)]
    done = convert("--config", str(base), *args, "--to-masks", str(masks))
    assert done.returncode == 0, done.stderr
    configs = {name: load_config(base, values) for name, values in sets.items()}
    exps = {name: open_experiment(config) for name, config in configs.items()}
    pd.testing.assert_frame_equal(exps["csv"].table, exps["masks"].table)
    assert exps["csv"].csv_format == exps["masks"].csv_format == "instances"
    assert (configs["csv"].run_dir / "folds.csv").read_bytes() == (
        configs["masks"].run_dir / "folds.csv"
    ).read_bytes()
