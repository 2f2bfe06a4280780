"""The training CLI's fold jobs on a tiny generated set: parallel fold processes and
their interruption, Ray tasks, the mirrored strategy over two logical CPUs (apart from
``test_train.py`` so that ``--dist loadfile`` spreads the slow files over the workers)."""

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
from tests.integration.test_train import run_cli

pytestmark = pytest.mark.slow


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
