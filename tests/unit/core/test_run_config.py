"""Configs that runs recorded with earlier versions still load, or are refused with what
to do (``config.read_run_config``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import CONFIG_DIR, ConfigError, load_config, read_run_config

# A run's config.yaml as save_config wrote it at 057f31a: configs/demo.yaml over
# configs/default.yaml, in the key set of that version.
OLD_RUN_CONFIG = Path(__file__).parent / "fixtures" / "run_config_057f31a.yaml"


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_run_config_of_057f31a_loads_as_the_config_it_recorded():
    old = read_run_config(OLD_RUN_CONFIG)
    # data.demo came later: a run recorded before it has its default.
    assert old.data.demo is False
    assert old.to_dict() == load_config(CONFIG_DIR / "demo.yaml", ["data.demo=false"]).to_dict()
    assert old.source == str(OLD_RUN_CONFIG)


def test_keys_added_since_take_their_defaults(tmp_path):
    data = yaml.safe_load(OLD_RUN_CONFIG.read_text())
    del data["train"]["bn_recalibration"], data["energy"]
    config = read_run_config(write(tmp_path / "config.yaml", data))
    assert config.train.bn_recalibration is False and config.energy.pue == 1.2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["train"].update(warmup=3), r"unknown config key 'train.warmup'"),
        (lambda d: d["train"].update(epochs=0), r"'train.epochs' must be an integer >= 1"),
    ],
)
def test_a_run_config_this_version_cannot_read_is_refused_with_what_to_do(tmp_path, edit, message):
    data = yaml.safe_load(OLD_RUN_CONFIG.read_text())
    edit(data)
    path = write(tmp_path / "config.yaml", data)
    with pytest.raises(ConfigError, match=message) as err:
        read_run_config(path)
    assert str(path) in str(err.value) and "Retrain with --force" in str(err.value)


def test_folds_recorded_by_057f31a_are_compared_as_they_were_trained(tmp_path):
    from pipeline.run.fold_records import trained_config_differences

    config = load_config(CONFIG_DIR / "demo.yaml", [f"runs_dir={tmp_path}"])
    for fold in range(config.folds.n_splits):
        config.fold_dir(fold).mkdir(parents=True)
        shutil.copy(OLD_RUN_CONFIG, config.fold_dir(fold) / "config.yaml")
    assert trained_config_differences(config) == []
    changed = config.with_overrides(["model.backbone=resnet18"])
    assert len(trained_config_differences(changed)) == config.folds.n_splits


def test_keys_renamed_since_are_migrated(tmp_path):
    data = yaml.safe_load(OLD_RUN_CONFIG.read_text())
    assert data["data"]["layout"] == "auto"  # data.csv_format's name at 057f31a
    data["data"]["layout"] = "image_label"
    config = read_run_config(write(tmp_path / "config.yaml", data))
    assert config.data.csv_format == "image_label"
    assert "layout" not in config.to_dict()["data"]


def test_a_fold_trained_under_the_old_key_name_compares_by_its_value(tmp_path):
    from pipeline.run.fold_records import trained_config_differences

    config = load_config(CONFIG_DIR / "demo.yaml", [f"runs_dir={tmp_path}", "folds.n_splits=2"])
    data = yaml.safe_load(OLD_RUN_CONFIG.read_text())
    data["data"]["layout"], data["folds"]["n_splits"] = "image_label", 2
    for fold in range(2):
        config.fold_dir(fold).mkdir(parents=True)
        write(config.fold_dir(fold) / "config.yaml", data)
    assert trained_config_differences(config.with_overrides(["data.csv_format=image_label"])) == []
    lines = trained_config_differences(config)
    assert lines[0].startswith("data.csv_format: 'image_label' in ") and "'auto' now" in lines[0]
