"""The pipeline's raw network is at least as good as a minimal Keras script (#18).

Both train the same folds of a small generated set at equal settings (loss, Adam at the
same learning rate, batch, epochs, flips, BatchNorm momentum, callbacks) and are scored
the same way: OOF Kaggle Dice at 0.5 at the submission size with the same flip views.
``benchmarks/minimal_keras.py`` is the script; ``benchmarks/bench_quality.py`` runs the
full comparison (3 seeds, DSB 2018 and the demo). A pipeline that falls behind by more
than the margin has broken something between training and its OOF predictions
(optimizer, preprocessing, BatchNorm in inference, TTA inversion, resizing, the
threshold rule...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import minimal_keras
from pipeline.core.config import load_config
from pipeline.core.images import resolve_image_path
from pipeline.make_demo_data import make_demo_data
from pipeline.run.experiment import open_experiment
from pipeline.train import train_folds
from tests.conftest import write_tiny_config

# Measured here (2-core CPU, 120 images at 32x64, 10 epochs, 2 folds, one run each):
# pipeline 0.793, script 0.775. With the augmentation bug this test was written for
# (both flips drawn together) the pipeline trailed the script on every DSB seed of
# bench_quality (-0.019 on average) and by 0.029 here at 64x96; runs of this size
# differ by a few hundredths from seed to seed, hence the margin.
MARGIN = 0.06

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quality") / "data"
    make_demo_data(out, n_train=120, n_test=4, height=64, width=96, truth_size=(64, 96), seed=3)
    return out


def compare(config_path: Path) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Train folds 0 and 1 with the pipeline and with the minimal script: both OOF
    figures (Kaggle Dice at 0.5) and both per-class means."""
    config = load_config(config_path)
    results = train_folds(config, [0, 1])
    n_val = sum(r["n_val"] for r in results)
    pipeline_oof = sum(r["oof_kaggle_dice_050"] * r["n_val"] for r in results) / n_val
    per_class = sum(
        np.array(list(r["oof_kaggle_dice_050_per_class"].values())) * r["n_val"] for r in results
    )
    exp = open_experiment(config)
    paths = {i: resolve_image_path(Path(config.data.train_images), i) for i in exp.image_ids}
    settings = minimal_keras.settings_from_config(config, len(exp.classes))
    script = np.concatenate(
        [
            minimal_keras.train_fold(paths, exp.rles(), *exp.members(k), settings)["per_image"]
            for k in (0, 1)
        ]
    )
    return pipeline_oof, float(script.mean()), per_class / n_val, script.mean(axis=0)


def test_pipeline_oof_is_not_below_the_minimal_script(tmp_path: Path, quality_data: Path) -> None:
    path = write_tiny_config(
        tmp_path,
        quality_data,
        data={"image_size": [32, 64], "submission_size": [64, 96]},
        model={"backbone": "resnet18", "bn_momentum": 0.9},
        train={
            "crop_size": [32, 64],
            "batch_size": 8,
            "accumulation_steps": 1,
            "lr": 0.002,
            "epochs": 10,
            "loss": "bce_jaccard",  # learns presence within a few epochs, unlike pure Jaccard
        },
        augment=[
            {"name": "HorizontalFlip", "params": {"p": 0.5}},
            {"name": "VerticalFlip", "params": {"p": 0.5}},
        ],
        tta={"views": ["identity", "hflip", "vflip", "hvflip"], "batch_size": 8},
    )
    pipeline_oof, script_oof, _, _ = compare(path)
    print(f"pipeline OOF {pipeline_oof:.4f}, minimal script OOF {script_oof:.4f}")
    assert pipeline_oof >= script_oof - MARGIN, (pipeline_oof, script_oof)


@pytest.fixture(scope="module")
def scenes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "data"
    # Street scenes (#33): several classes per image, two of them large and frequent,
    # photographs of another size and aspect than the network's input.
    make_demo_data(out, 64, 2, 72, 96, (72, 96), 3, variant="scenes")
    return out


def test_pipeline_oof_is_not_below_the_minimal_script_on_multiclass_scenes(
    tmp_path: Path, scenes_data: Path
) -> None:
    path = write_tiny_config(
        tmp_path,
        scenes_data,
        data={"image_size": [32, 64], "submission_size": None},
        model={"backbone": "resnet18", "bn_momentum": 0.9},
        train={
            "crop_size": [32, 64],
            "batch_size": 8,
            "accumulation_steps": 1,
            "lr": 0.002,
            "epochs": 6,
            "loss": "jaccard",
        },
        augment=[
            {"name": "HorizontalFlip", "params": {"p": 0.5}},
            {"name": "VerticalFlip", "params": {"p": 0.5}},
        ],
        tta={"views": ["identity", "hflip"], "batch_size": 8},
    )
    pipeline_oof, script_oof, pipeline_classes, script_classes = compare(path)
    print(f"scenes: pipeline OOF {pipeline_oof:.4f} {pipeline_classes.round(3).tolist()}, "
          f"minimal script OOF {script_oof:.4f} {script_classes.round(3).tolist()}")  # fmt: skip
    assert pipeline_oof >= script_oof - MARGIN, (pipeline_oof, script_oof)
    # The frequent classes (Road, Building) too: where the held-out set showed the gap.
    frequent = [0, 1]
    assert pipeline_classes[frequent].mean() >= script_classes[frequent].mean() - MARGIN
