"""Predict's stored test outputs: reused while what they came from is unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.config import load_config
from pipeline.core.layout import BEST_WEIGHTS, CLASSIFIER_STAGE, TEST_CLS, TEST_PRESENCE
from pipeline.run.stored_predictions import (
    fresh_test_presence,
    write_test_keys,
    write_test_presence,
)

CLASSES = ["a", "b"]
IDS = ["x.png", "y.png"]


@pytest.fixture
def config(tmp_path: Path):
    folder = tmp_path / "test_images"
    folder.mkdir()
    for name in IDS:
        cv2.imwrite(str(folder / name), np.zeros((4, 4, 3), np.uint8))
    config = load_config(
        overrides=[f"runs_dir={tmp_path / 'runs'}", f"data.test_images={folder}", "experiment=e"]
    )
    config.run_dir.mkdir(parents=True)
    return config


def _classifier_weights(config, content: bytes) -> None:
    for fold in range(config.folds.n_splits):
        path = config.fold_dir(fold, CLASSIFIER_STAGE) / BEST_WEIGHTS
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_the_classifier_presence_is_fresh_until_its_weights_change(config) -> None:
    values = np.array([[0.9, 0.1], [0.2, 0.8]])
    _classifier_weights(config, b"one")
    write_test_presence(config, "classifier", values, CLASSES, IDS)
    assert (config.run_dir / TEST_CLS).is_file()
    assert fresh_test_presence(config, CLASSES, IDS, "classifier") is None  # no key yet
    write_test_keys(config, classifier_ran=True)
    got = fresh_test_presence(config, CLASSES, list(reversed(IDS)), "classifier")
    np.testing.assert_allclose(got, values[::-1], atol=1e-6)  # in the order asked for
    assert fresh_test_presence(config, CLASSES, [*IDS, "z.png"], "classifier") is None
    # A later predict that did not run the classifier keeps its still-current key...
    write_test_keys(config, classifier_ran=False)
    assert fresh_test_presence(config, CLASSES, IDS, "classifier") is not None
    # ...also when the segmentation folds were retrained (the test probs' key changes):
    for fold in range(config.folds.n_splits):
        path = config.fold_dir(fold) / BEST_WEIGHTS
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"segmentation")
    write_test_keys(config, classifier_ran=False)
    assert fresh_test_presence(config, CLASSES, IDS, "classifier") is not None
    # ...but retrained classifier folds make the stored table stale, and it stays so.
    _classifier_weights(config, b"retrained")
    assert fresh_test_presence(config, CLASSES, IDS, "classifier") is None
    write_test_keys(config, classifier_ran=False)
    _classifier_weights(config, b"one")
    os.utime(config.fold_dir(0, CLASSIFIER_STAGE) / BEST_WEIGHTS, ns=(1, 1))
    assert fresh_test_presence(config, CLASSES, IDS, "classifier") is None


def test_the_head_presence_follows_the_test_probs_key(config) -> None:
    values = np.array([[0.5, 0.5], [0.25, 0.75]])
    write_test_presence(config, "head", values, CLASSES, IDS)
    assert (config.run_dir / TEST_PRESENCE).is_file()
    write_test_keys(config, classifier_ran=False)
    np.testing.assert_allclose(fresh_test_presence(config, CLASSES, IDS, "head"), values)
    # Another TTA changes what predict stores: the head's table is stale with it.
    other = load_config(
        overrides=[
            f"runs_dir={config.runs_dir}",
            f"data.test_images={config.data.test_images}",
            "experiment=e",
            "tta.views=[identity]",
        ]
    )
    assert fresh_test_presence(other, CLASSES, IDS, "head") is None
    with pytest.raises(ValueError, match="presence source must be one of"):
        fresh_test_presence(config, CLASSES, IDS, "tea leaves")
