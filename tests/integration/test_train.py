"""The real training CLI on a tiny generated set: folds, resume, the mirrored strategy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from pipeline.core.layout import FOLD_METRICS
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


def test_all_folds_as_parallel_processes(tmp_path, tiny_data):
    """SIGTERM to --all stops every fold process and says how to resume; --all --resume
    then finishes each fold once."""
    # 4 epochs of 10 steps: after the first (which traces the model), three are left to
    # interrupt even on a loaded machine.
    config = write_tiny_config(
        tmp_path, tiny_data, train={"parallel_folds": 2, "epochs": 4, "steps_per_epoch": 10}
    )
    run = tmp_path / "runs" / "tiny"
    parent = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--config", str(config), "--all"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    states = [run / f"fold_{k}" / "checkpoint" / "state.json" for k in (0, 1)]
    deadline = time.monotonic() + 400
    while not all(state.is_file() for state in states):  # both folds past epoch 1
        assert time.monotonic() < deadline and parent.poll() is None, "no fold got going"
        time.sleep(0.2)
    parent.send_signal(signal.SIGTERM)
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted: every fold keeps its last completed epoch" in stderr
    assert "--all --resume" in stderr
    deadline = time.monotonic() + 20
    while fold_processes(str(run)):
        assert time.monotonic() < deadline, f"fold processes left: {fold_processes(str(run))}"
        time.sleep(0.2)

    # A fold whose last epochs outran the signal is finished (the first epoch's tracing
    # dominates; the later ones of a tiny fold take a fraction of a second).
    unfinished = [k for k in (0, 1) if not (run / f"fold_{k}" / FOLD_METRICS).is_file()]
    assert unfinished, "both folds finished before the interrupt"
    out = run_cli("pipeline.train", "--config", str(config), "--all", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    if len(unfinished) == 2:
        assert "2 at a time with" in out.stderr
    else:
        assert "already finished" in out.stderr
    for fold in (0, 1):
        fold_dir = run / f"fold_{fold}"
        assert pd.read_csv(fold_dir / "history.csv")["epoch"].tolist() == [1, 2, 3, 4]
        if len(unfinished) == 2:  # progress forwarded from the fold processes
            assert f"[segmentation fold {fold}] epoch 4/4" in out.stderr
            assert "--fold" in (fold_dir / "train.log").read_text()
        assert len(ProbReader(fold_dir / "oof").image_ids) == 9
    assert "fold 1: OOF Kaggle Dice at 0.5 = " in out.stdout


def test_ray_fold_tasks_give_the_local_pools_figures(tmp_path, tiny_data):
    """--all on a local Ray instance (jobs.executor: ray) trains each fold as a Ray task
    with the same figures as the local pool."""
    figures = {}
    for executor in ("local", "ray"):
        (tmp_path / executor).mkdir()
        config = write_tiny_config(
            tmp_path / executor,
            tiny_data,
            train={"parallel_folds": 2},
            jobs={"executor": executor, "cpus_per_job": 1},
        )
        # Deterministic kernels: CPU float sums may otherwise differ in the last digit
        # between two runs (bench_jobs saw it) and a short run can diverge from there.
        env = {**os.environ, "TF_DETERMINISTIC_OPS": "1"}
        out = run_cli("pipeline.train", "--config", str(config), "--all", env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"running 2 fold jobs on {executor}, 2 at a time with 1 threads each" in out.stderr
        assert "[segmentation fold 1] epoch 2/2" in out.stderr  # forwarded progress
        run = tmp_path / executor / "runs" / "tiny"
        figures[executor] = [
            json.loads((run / f"fold_{k}" / "metrics.json").read_text())["oof_kaggle_dice_050"]
            for k in (0, 1)
        ]
    assert "visible from all 1 Ray node(s)" in out.stderr
    assert figures["ray"] == figures["local"]


def fold_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions ``marker`` (a run directory)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as handle:
                zombie = handle.read().split(")")[-1].split()[0] == "Z"
        except OSError:
            continue
        if marker in cmdline and not zombie:
            pids.append(int(entry))
    return pids


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


def test_mirrored_strategy_on_two_logical_cpus(tmp_path, tiny_data):
    """9 validation images in global batches of 8: a final batch of one would leave a
    replica an empty slice, which oneDNN's convolution (default on AVX-512/AMX CPUs,
    forced on here so that every machine tests it) turns into a BatchNorm error. The
    BatchNorm recalibration of a strategy's model goes through a plain copy."""
    config = write_tiny_config(
        tmp_path,
        tiny_data,
        train={"epochs": 1, "strategy": "mirrored", "bn_recalibration": True},
    )
    two_cpus = ("--config", str(config), "--fold", "0", "--logical-cpus", "2")
    onednn = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"}
    out = run_cli("pipeline.train", *two_cpus, env=onednn)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs/tiny/fold_0/metrics.json").read_text())
    assert metrics["replicas"] == 2
    # 9 training images in per-replica batches of 4 on the plain copy: 2 batches.
    assert metrics["bn_recalibration_batches"] == 2
    assert "BatchNorm statistics re-estimated on 2 batches" in out.stderr
    # batch_size is per replica: 2 replicas x 4 images x 2 accumulated batches.
    assert "2 replica(s) x batch 4, 2 accumulated -> 16 images per Adam step" in out.stderr
    history = pd.read_csv(tmp_path / "runs/tiny/fold_0/history.csv")
    assert np.isfinite(history["loss"]).all()
    # The classifier trains on the same two replicas.
    out = run_cli(
        "pipeline.train_classifier",
        *two_cpus,
        "--set",
        "classifier.epochs=1",
        "--set",
        "classifier.image_size=[32,64]",
        env=onednn,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs/tiny/classifier/fold_0/metrics.json").read_text())
    assert metrics["replicas"] == 2 and np.isfinite(metrics["oof_auc"])


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
