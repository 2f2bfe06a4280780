"""Shared fixtures: a tiny generated data set and configs that shrink the real ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.core.config import CONFIG_DIR
from pipeline.make_demo_data import make_demo_data
from pipeline.run.process import framework_of_process

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Clouds-like set: 18 train and 6 test images of 64x96, truth at 40x60."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    make_demo_data(out, n_train=18, n_test=6, height=64, width=96, truth_size=(40, 60), seed=7)
    return out


def write_tiny_config(tmp_path: Path, data_dir: Path, /, **sections: dict) -> Path:
    """A config over configs/demo.yaml that trains in seconds on the tiny data set."""
    config = {
        "base": str(CONFIG_DIR / "demo.yaml"),
        "experiment": "tiny",
        "runs_dir": str(tmp_path / "runs"),
        # The suite's Keras layer (make test runs part of it again on keras3).
        "framework": framework_of_process(),
        "data": {
            "demo": False,
            "train_csv": str(data_dir / "train.csv"),
            "train_images": str(data_dir / "train_images"),
            "test_images": str(data_dir / "test_images"),
            "sample_submission": str(data_dir / "sample_submission.csv"),
            "test_truth": str(data_dir / "test_truth.csv"),
            "image_size": [32, 64],
            "submission_size": [40, 60],
        },
        "folds": {"n_splits": 2},
        "model": {"backbone": "resnet18", "encoder_weights": None},
        "train": {
            "crop_size": [32, 32],
            "batch_size": 4,
            "accumulation_steps": 2,
            "epochs": 2,
            "verbose": 0,
            "parallel_folds": 1,
        },
        "tta": {"views": ["identity", "hflip"], "batch_size": 8},
    }
    for name, values in sections.items():
        config.setdefault(name, {})
        if isinstance(values, dict):
            config[name].update(values)
        else:
            config[name] = values
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
