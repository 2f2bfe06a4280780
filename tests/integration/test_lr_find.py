"""The LR finder CLI on the tiny generated set, and ``train.lr: auto`` reading its result."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest

from pipeline.core.config import load_config
from pipeline.lr_find import resolve_lr
from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow


def test_lr_find_writes_curve_plot_and_a_finite_suggestion(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, lr_find={"steps": 20})
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.lr_find", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    directory = tmp_path / "runs" / "tiny" / "lr_find"
    frame = pd.read_csv(directory / "lr_find.csv")
    assert list(frame.columns) == ["lr", "loss", "smoothed"]
    assert 2 <= len(frame) <= 20 and frame["lr"].is_monotonic_increasing
    assert frame["lr"].iloc[0] == pytest.approx(1e-7)
    assert (directory / "lr_find.png").stat().st_size > 0
    result = json.loads((directory / "lr_find.json").read_text())
    assert math.isfinite(result["suggested_lr"]) and result["suggested_lr"] > 0
    assert result["steps_run"] == len(frame) and result["fold"] == 0
    assert result["images_per_step"] == 4 and result["training_images_per_step"] == 8
    assert "suggested lr:" in out.stdout and "accumulates 2 batches" in out.stdout
    auto = load_config(config, ["train.lr=auto"])
    assert resolve_lr(auto) == result["suggested_lr"]


def test_lr_find_rejects_a_fold_outside_the_split(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, lr_find={"steps": 20})
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.lr_find", "--config", str(config), "--fold", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2 and "fold must be in [0, 1]; got 5" in out.stderr
