"""The real classifier CLI on a tiny generated set: both folds, OOF coverage, skipping."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow

CLASSIFIER = {
    "backbone": "resnet18",
    "image_size": [32, 64],
    "epochs": 1,
    "batch_size": 4,
    "pooling": "avgmax",
    "multiscale_pooling": True,
}


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_all_folds_train_and_cover_every_image_once(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, classifier=CLASSIFIER)
    out = run_cli("pipeline.train_classifier", "--config", str(config), "--all")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "all 2 folds pooled: OOF AUC" in out.stdout
    run = tmp_path / "runs" / "tiny"
    folds = pd.read_csv(run / "folds.csv", dtype={"image_id": str})
    classes = ["Fish", "Flower", "Gravel", "Sugar"]
    frames = []
    for fold in (0, 1):
        fold_dir = run / "classifier" / f"fold_{fold}"
        for name in ("best_weights.h5", "history.csv", "curves.png", "checkpoint"):
            assert (fold_dir / name).exists(), name
        history = pd.read_csv(fold_dir / "history.csv")
        assert history["epoch"].tolist() == [1]
        assert {"loss", "auc", "val_auc", "val_accuracy", "lr"} <= set(history.columns)
        oof = pd.read_csv(fold_dir / "oof_cls.csv", dtype={"image_id": str})
        assert list(oof.columns) == ["image_id", *classes]
        assert set(oof["image_id"]) == set(folds.loc[folds["fold"] == fold, "image_id"])
        frames.append(oof)
        metrics = json.loads((fold_dir / "metrics.json").read_text())
        for key in (
            "oof_auc",
            "oof_auc_per_class",
            "oof_accuracy_050",
            "oof_sensitivity_050",
            "oof_specificity_050",
            "train_seconds",
            "device",
        ):
            assert key in metrics, key
        assert set(metrics["oof_auc_per_class"]) == set(classes)
        assert metrics["n_val"] == len(oof)
    oof = pd.concat(frames)
    assert sorted(oof["image_id"]) == sorted(folds["image_id"])  # each image exactly once
    probs = oof[classes].to_numpy()
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    # The classifier reads the segmentation split; it must not have made its own.
    assert not (run / "classifier" / "folds.csv").exists()

    again = run_cli("pipeline.train_classifier", "--config", str(config), "--all")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already finished") == 2
    pd.testing.assert_frame_equal(
        pd.read_csv(run / "classifier" / "fold_0" / "oof_cls.csv", dtype={"image_id": str}),
        frames[0],
    )


def test_bad_fold_and_interrupted_run_are_refused(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, classifier=CLASSIFIER)
    bad = run_cli("pipeline.train_classifier", "--config", str(config), "--fold", "5")
    assert bad.returncode == 2 and "fold must be in [0, 1]; got 5" in bad.stderr
    (tmp_path / "runs" / "tiny" / "classifier" / "fold_1" / "checkpoint").mkdir(parents=True)
    refused = run_cli("pipeline.train_classifier", "--config", str(config), "--fold", "1")
    assert refused.returncode == 2
    assert "classifier fold 1 has an interrupted run" in refused.stderr
    assert "--resume" in refused.stderr
