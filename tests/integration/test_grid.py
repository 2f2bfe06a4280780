"""The grid CLI on the tiny generated set: two experiments, tables, resumability."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow


def run_grid(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.grid", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_grid_module_does_not_import_tensorflow():
    code = "import sys, pipeline.grid; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_grid_trains_each_setting_then_skips_finished_runs(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, train={"epochs": 1})
    args = ("--config", str(config), "--grid", "train.lr=[0.001,0.003]", "--seeds", "1")
    out = run_grid(*args, "--folds", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = tmp_path / "runs"
    names = ["tiny__train.lr=0.001__seed=12345", "tiny__train.lr=0.003__seed=12345"]
    for name in names:
        assert (runs / name / "fold_0" / "metrics.json").is_file()
        assert not (runs / name / "fold_1").exists()  # only the requested fold
    assert (runs / "tiny__grid" / "cache").is_dir()  # one image cache for the grid
    results = pd.read_csv(runs / "tiny__grid" / "results.csv")
    assert sorted(results["experiment"]) == names
    assert results["fold_0"].between(0, 1).all() and (results["cv_mean"] == results["fold_0"]).all()
    summary = pd.read_csv(runs / "tiny__grid" / "summary.csv")
    assert len(summary) == 2 and summary["mean_cv"].is_monotonic_decreasing
    assert "cannot judge" in out.stdout and "identical folds" in out.stdout

    again = run_grid(*args, "--folds", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already finished") == 2
    assert "epoch 1/" not in again.stderr  # nothing trained again
    rerun = pd.read_csv(runs / "tiny__grid" / "results.csv")
    assert (rerun["status"] == "already finished").all()
    assert rerun.drop(columns="status").equals(results.drop(columns="status"))


def test_a_failing_run_does_not_stop_the_grid(tmp_path, tiny_data):
    # 48 is not a multiple of 32: training refuses it, after the config accepted it.
    config = write_tiny_config(tmp_path, tiny_data, train={"epochs": 1})
    out = run_grid(
        "--config", str(config), "--grid", "train.crop_size=[[48,48],[32,48]]", "--folds", "0"
    )
    assert out.returncode == 1
    assert out.stderr.count("FAILED (exit 2)") == 2
    results = pd.read_csv(tmp_path / "runs" / "tiny__grid" / "results.csv")
    assert results["status"].tolist() == ["failed (exit 2)", "failed (exit 2)"]
    log = (
        tmp_path / "runs/tiny__grid/logs/tiny__train.crop_size=48x48__seed=12345.log"
    ).read_text()
    assert "divisible by 32" in log


def test_grid_errors_exit_2(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data)
    out = run_grid("--config", str(config), "--grid", "train.lrr=[1,2]")
    assert out.returncode == 2 and "unknown config key 'train.lrr'" in out.stderr
    out = run_grid("--config", str(config), "--grid", "train.lr=[0.1]", "--folds", "0,4")
    assert out.returncode == 2 and "--folds must name folds in [0, 1]" in out.stderr


def test_grid_points_run_side_by_side_as_ray_tasks(tmp_path, tiny_data):
    """jobs.executor: ray: one Ray task per fold of every grid point; a failing point
    is recorded and does not stop the other."""
    config = write_tiny_config(tmp_path, tiny_data, train={"epochs": 1})
    out = run_grid(
        "--config", str(config), "--set", "jobs.executor=ray", "--set", "jobs.cpus_per_job=1",
        "--grid", "train.crop_size=[[32,32],[48,48]]", "--folds", "0",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert "grid on Ray: 2 fold tasks, 2 at a time" in out.stderr
    grid = tmp_path / "runs" / "tiny__grid"
    results = pd.read_csv(grid / "results.csv").set_index("experiment")
    good, bad = "tiny__train.crop_size=32x32__seed=12345", "tiny__train.crop_size=48x48__seed=12345"
    assert results.loc[good, "status"] == "done" and 0 <= results.loc[good, "fold_0"] <= 1
    assert results.loc[bad, "status"] == "failed (exit 2)"
    assert "divisible by 32" in (grid / "logs" / f"{bad}.fold0.log").read_text()
    assert "--fold 0 --resume" in (grid / "logs" / f"{good}.fold0.log").read_text()


def test_grid_tunes_each_run_and_ranks_by_the_nested_figure(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, train={"epochs": 1})
    args = ("--config", str(config), "--grid", "postprocess.min_components=[[0],[0,100]]", "--tune")
    refused = run_grid(*args, "--folds", "0")
    assert refused.returncode == 2 and "--tune needs every fold" in refused.stderr
    out = run_grid(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("tuning (log") == 2
    runs = tmp_path / "runs"
    results = pd.read_csv(runs / "tiny__grid" / "results.csv")
    searched = []
    for _, row in results.iterrows():
        saved = json.loads((runs / row["experiment"] / "postprocess.json").read_text())
        assert row["nested_cv"] == pytest.approx(saved["extra"]["scores"]["tuned_nested"])
        assert row["tuned_cv_in_sample"] == pytest.approx(saved["extra"]["scores"]["tuned"])
        searched.append(saved["extra"]["grid"]["min_components"])
    assert sorted(searched) == [[0], [0, 100]]  # each run tuned with its own setting
    summary = pd.read_csv(runs / "tiny__grid" / "summary.csv")
    assert summary["mean_nested"].is_monotonic_decreasing
    assert "compared on: nested tuned CV" in out.stdout and "mean_nested:" in out.stdout
    again = run_grid(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "tuning (log" not in again.stderr and again.stderr.count("already tuned") == 2
    kept = pd.read_csv(runs / "tiny__grid" / "results.csv")
    assert kept.drop(columns="status").equals(results.drop(columns="status"))
    # Another tuning setting: the same trained folds, tuned again.
    changed = run_grid(*args, "--set", "postprocess.thresholds=[0.3,0.5]")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert changed.stderr.count("tuning (log") == 2 and "epoch 1/" not in changed.stderr
