"""The real training CLI on a tiny generated set: folds, resume, the mirrored strategy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipeline.core.probstore import ProbReader
from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow


def run_cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_two_folds_train_and_write_oof(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data)
    out = run_cli("pipeline.train", "--config", str(config), "--all")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    folds = pd.read_csv(run / "folds.csv")
    ids = set()
    for fold in (0, 1):
        fold_dir = run / f"fold_{fold}"
        history = pd.read_csv(fold_dir / "history.csv")
        assert history["epoch"].tolist() == [1, 2]
        assert {"loss", "val_dice", "val_kaggle_dice", "lr"} <= set(history.columns)
        assert (fold_dir / "best_weights.h5").is_file() and (fold_dir / "curves.png").is_file()
        metrics = json.loads((fold_dir / "metrics.json").read_text())
        assert 0.0 <= metrics["oof_kaggle_dice_050"] <= 1.0
        reader = ProbReader(fold_dir / "oof")
        expected = set(folds.loc[folds["fold"] == fold, "image_id"])
        assert set(reader.image_ids) == expected
        assert reader.shape(reader.image_ids[0]) == (4, 40, 60)  # (C, H, W) at submission size
        ids |= set(reader.image_ids)
    assert ids == set(folds["image_id"])  # every training image predicted out of fold once
    again = run_cli("pipeline.train", "--config", str(config), "--all")
    assert again.returncode == 0 and "already finished" in again.stderr
    # A job array's task run again: --resume of a finished fold is a no-op, not an error.
    resumed = run_cli("pipeline.train", "--config", str(config), "--fold", "1", "--resume")
    assert resumed.returncode == 0 and "already finished" in resumed.stderr, resumed.stderr[-2000:]
    assert "fold 1: OOF Kaggle Dice at 0.5 = " in resumed.stdout


def test_fold_outside_the_split_is_an_error(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data)
    out = run_cli("pipeline.train", "--config", str(config), "--fold", "7")
    assert out.returncode == 2
    assert "fold must be in [0, 1]; got 7" in out.stderr


def test_killed_run_resumes_where_it_stopped(tmp_path, tiny_data):
    # 8 epochs (no early stop): the lock check below starts a second TensorFlow, which
    # takes a while on a loaded machine; training must still be running after it.
    config = write_tiny_config(
        tmp_path, tiny_data, train={"epochs": 8, "early_stopping_patience": 100}
    )
    fold_dir = tmp_path / "runs" / "tiny" / "fold_0"
    state = fold_dir / "checkpoint" / "state.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--config", str(config), "--fold", "0"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400
    while not (fold_dir / ".lock").is_file():
        assert time.monotonic() < deadline and proc.poll() is None, "training never started"
        time.sleep(0.2)
    second = run_cli("pipeline.train", "--config", str(config), "--fold", "0", "--resume")
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"segmentation fold 0 is being written by pid {proc.pid} on host" in second.stderr
    while time.monotonic() < deadline:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 2:
            break
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # like a lost machine: no clean shutdown
    proc.wait()
    stopped_at = json.loads(state.read_text())["epoch"]
    assert 2 <= stopped_at < 8
    assert not (fold_dir / "metrics.json").exists()

    refused = run_cli("pipeline.train", "--config", str(config), "--fold", "0")
    assert refused.returncode == 2 and "--resume" in refused.stderr

    out = run_cli("pipeline.train", "--config", str(config), "--fold", "0", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from epoch {stopped_at}" in out.stderr
    history = pd.read_csv(fold_dir / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 9))  # continued, not restarted
    assert json.loads((fold_dir / "metrics.json").read_text())["epochs_run"] == 8


def test_progressive_unfreezing_changes_phase_and_lr(tmp_path, tiny_data):
    schedule = [{"epoch": 1, "fraction": 0.5, "lr": 0.0005}]
    config = write_tiny_config(
        tmp_path, tiny_data, model={"unfreeze_schedule": schedule}, train={"lr": 0.002}
    )
    out = run_cli("pipeline.train", "--config", str(config), "--fold", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "phase 0 from epoch 1: 0 encoder layers trainable" in out.stderr
    assert "phase 1 from epoch 2" in out.stderr and "(top 50%), lr 0.0005" in out.stderr
    history = pd.read_csv(tmp_path / "runs/tiny/fold_0/history.csv")
    assert history["lr"].round(6).tolist() == [0.002, 0.0005]


def test_swa_over_the_best_epochs_through_the_cli(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data)
    out = run_cli(
        "pipeline.train", "--config", str(config), "--fold", "0",
        "--set", "train.epochs=3", "--set", "train.swa_top=2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    fold_dir = tmp_path / "runs" / "tiny" / "fold_0"
    kept = sorted(p.name for p in (fold_dir / "swa").iterdir())
    assert len(kept) == 2 and all(name.startswith("epoch_") for name in kept)
    assert "(the 2 best by val_dice) averaged into" in out.stderr
    metrics = json.loads((fold_dir / "metrics.json").read_text())
    assert metrics["bn_recalibration_batches"] > 0  # the average gets statistics of its own
    assert len(metrics["swa_epochs"]) == 2
    assert 0.0 <= metrics["oof_kaggle_dice_050"] <= 1.0
