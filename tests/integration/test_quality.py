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
    config = load_config(path)
    results = train_folds(config, [0, 1])
    n_val = sum(r["n_val"] for r in results)
    pipeline_oof = sum(r["oof_kaggle_dice_050"] * r["n_val"] for r in results) / n_val

    exp = open_experiment(config)
    paths = {i: resolve_image_path(Path(config.data.train_images), i) for i in exp.image_ids}
    settings = minimal_keras.settings_from_config(config, len(exp.classes))
    script = np.concatenate(
        [
            minimal_keras.train_fold(paths, exp.rles(), *exp.members(k), settings)["per_image"]
            for k in (0, 1)
        ]
    )
    script_oof = float(script.mean())
    print(f"pipeline OOF {pipeline_oof:.4f}, minimal script OOF {script_oof:.4f}")
    assert pipeline_oof >= script_oof - MARGIN, (pipeline_oof, script_oof)
