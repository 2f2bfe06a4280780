"""Experiment tracking in a real local MLflow store, read back through the MLflow client:
a tiny fold tracked as it trains, killed and resumed into the same run; a store that
cannot be written does not stop training and is reported once; ``foldseg track``
uploads afterwards; nothing imports mlflow when tracking is off; the MLflow UI server
serves the tracked runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import load_config
from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

EXPERIMENT = "foldseg"


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def store_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def tracked_config(tmp_path: Path, data: Path, uri: str, **sections: dict) -> Path:
    tracking = {"backend": "mlflow", "uri": uri}
    return write_tiny_config(tmp_path, data, tracking=tracking, **sections)


def experiment_runs(uri: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return client, client.search_runs([experiment.experiment_id], max_results=100)


def split_runs(runs: list) -> tuple[list, dict[str, object]]:
    """The experiments' runs and the fold runs by ``foldseg.fold``."""
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    folds = {r.data.tags["foldseg.fold"]: r for r in runs if "foldseg.fold" in r.data.tags}
    return parents, folds


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def fake_run_dir(run_dir: Path, config: dict, folds: int = 2, epochs: int = 3) -> None:
    """A run directory as training leaves it: per fold its trained config, history and
    metrics; and tune's postprocess.json."""
    for k in range(folds):
        fold = run_dir / f"fold_{k}"
        fold.mkdir(parents=True)
        (fold / "config.yaml").write_text(yaml.safe_dump(config))
        rows = ["epoch,loss,val_dice,lr,epoch_time"]
        rows += [f"{e},{1 / e:.3f},{0.5 + e / 10:.3f},0.001,1.5" for e in range(1, epochs + 1)]
        (fold / "history.csv").write_text("\n".join(rows) + "\n")
        metrics = {"fold": k, "best_epoch": epochs, "oof_kaggle_dice_050": 0.6 + k / 10}
        (fold / "metrics.json").write_text(json.dumps(metrics))
    scores = {"plain": 0.6, "tuned": 0.7, "tuned_nested": 0.65, "nested_fold_scores": [0.6, 0.7]}
    (run_dir / "postprocess.json").write_text(json.dumps({"extra": {"scores": scores}}))


def test_track_imports_run_directories_once(tmp_path, tiny_data):
    """``foldseg track RUN_DIR...`` imports existing runs (e.g. a grid's points): one
    run per experiment, its folds nested, per-epoch figures once even when run twice,
    the tuned CV labelled in-sample and nested."""
    uri = store_uri(tmp_path)
    config = load_config(write_tiny_config(tmp_path, tiny_data)).to_dict()
    points = [tmp_path / "grid" / name for name in ("lr_0.001", "lr_0.01")]
    for point in points:
        fake_run_dir(point, config)
    args = ["pipeline.track", "--config", str(tmp_path / "tiny.yaml")]
    args += ["--set", f"tracking.uri={uri}", *map(str, points)]
    for _ in range(2):
        out = run_cli(*args)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "sys.modules" not in out.stderr
    client, runs = experiment_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.run_name for r in parents) == ["lr_0.001", "lr_0.01"]
    for parent in parents:
        folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.tags["foldseg.fold"] for r in folds) == [
            "segmentation/0",
            "segmentation/1",
        ]
        for fold in folds:
            assert steps(client, fold.info.run_id, "val_dice") == [1, 2, 3]
            assert steps(client, fold.info.run_id, "lr") == [1, 2, 3]
            assert fold.data.metrics["oof_kaggle_dice_050"] >= 0.6
        figures = parent.data.metrics
        assert figures["cv.tuned_in_sample"] == 0.7 and figures["cv.tuned_nested"] == 0.65
        assert figures["segmentation.fold_1.oof_kaggle_dice_050"] == pytest.approx(0.7)
        assert parent.data.params["train.epochs"] == "2"


def test_nothing_imports_mlflow_when_tracking_is_off(tmp_path, tiny_data):
    """Every stage module imported, a run's files recorded with tracking off (the
    default): mlflow is not in sys.modules."""
    config = write_tiny_config(tmp_path, tiny_data)
    fake_run_dir(tmp_path / "runs" / "tiny", load_config(config).to_dict())
    script = f"""
import importlib, sys
from pipeline.core.commands import STAGES
from pipeline.core.config import load_config
from pipeline.run.tracking import open_tracker, record_run
for stage in STAGES:
    importlib.import_module(stage.module)
config = load_config({str(config)!r})
assert config.tracking.backend == "none"
tracker = open_tracker(config)
record_run(tracker, config)
tracker.finish()
print(sorted(m for m in sys.modules if m.split(".")[0] == "mlflow"))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_mlflow_ui_serves_the_tracked_runs(tmp_path, tiny_data):
    """The UI server (``mlflow server``, as docs/tracking.md opens it) on a tracked run:
    its page loads, and its REST API lists the experiment's run and its nested folds.
    (No browser can be installed here, so the page is fetched, not rendered.)"""
    uri = store_uri(tmp_path)
    config = write_tiny_config(tmp_path, tiny_data, tracking={"backend": "mlflow", "uri": uri})
    fake_run_dir(tmp_path / "runs" / "tiny", load_config(config).to_dict())
    out = run_cli("pipeline.track", "--config", str(config))
    assert out.returncode == 0, out.stderr[-3000:]
    port = free_port()
    serve = ["--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", *serve, "--workers", "1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        page = ""
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(base + "/", timeout=5) as response:
                    page = response.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert "<title>MLflow</title>" in page
        request = urllib.request.Request(
            base + "/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": ["1"], "max_results": 10}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())["runs"]
        names = sorted(r["info"]["run_name"] for r in runs)
        assert names == ["segmentation fold 0", "segmentation fold 1", "tiny"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_fold_tracked_as_it_trains_and_resumed_into_the_same_run(tmp_path, tiny_data):
    """A tiny fold with tracking on, killed after its second epoch and resumed: one
    experiment run, one fold run nested in it, every epoch's figures and learning rate
    logged once, the fold's summary and curves."""
    uri = store_uri(tmp_path)
    config = tracked_config(
        tmp_path, tiny_data, uri, train={"epochs": 4, "early_stopping_patience": 100}
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
    while time.monotonic() < deadline:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 2:
            break
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # like a lost machine: no clean shutdown
    proc.wait()
    stopped_at = json.loads(state.read_text())["epoch"]
    assert stopped_at < 4
    first_run = json.loads((fold_dir / "tracking.json").read_text())["run_id"]

    out = run_cli("pipeline.train", "--config", str(config), "--fold", "0", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "experiment tracking is off" not in out.stderr
    client, runs = experiment_runs(uri)
    parents, folds = split_runs(runs)
    assert [p.info.run_name for p in parents] == ["tiny"]
    assert list(folds) == ["segmentation/0"]
    fold = folds["segmentation/0"]
    assert fold.info.run_id == first_run  # continued, not a second run
    assert fold.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert fold.info.status == "FINISHED"
    for key in ("loss", "val_loss", "lr", "epoch_time"):
        assert steps(client, fold.info.run_id, key) == [1, 2, 3, 4], key
    metrics = json.loads((fold_dir / "metrics.json").read_text())
    assert fold.data.metrics["oof_kaggle_dice_050"] == pytest.approx(metrics["oof_kaggle_dice_050"])
    artifacts = {a.path for a in client.list_artifacts(fold.info.run_id)}
    assert {"curves.png", "history.csv", "metrics.json"} <= artifacts
    params = parents[0].data.params
    assert params["train.epochs"] == "4" and params["tracking.backend"] == "mlflow"


@pytest.mark.parametrize("store", ["unwritable", "unreachable"])
def test_unusable_store_is_reported_once_and_training_finishes(tmp_path, tiny_data, store):
    """A store that cannot be created (a file where its folder should be) or a server
    that is not there: both folds still train, one warning says so and names the command
    that uploads later; that command then uploads both folds."""
    if store == "unwritable":
        blocker = tmp_path / "not_a_folder"
        blocker.write_text("a file where the store's folder should be")
        bad = f"sqlite:///{blocker}/mlflow.db"
    else:
        bad = f"http://127.0.0.1:{free_port()}"
    config = tracked_config(tmp_path, tiny_data, bad, train={"epochs": 1})
    out = run_cli("pipeline.train", "--config", str(config), "--all")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("experiment tracking is off") == 1, out.stderr[-3000:]
    assert f"the MLflow store {bad} could not be used" in out.stderr
    assert f"foldseg track --config {config}" in out.stderr
    assert "Traceback" not in out.stderr
    for k in range(2):
        assert (tmp_path / "runs" / "tiny" / f"fold_{k}" / "metrics.json").is_file()
    if store == "unreachable":
        return

    uri = store_uri(tmp_path)
    out = run_cli("pipeline.track", "--config", str(config), "--set", f"tracking.uri={uri}")
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = experiment_runs(uri)
    parents, folds = split_runs(runs)
    assert len(parents) == 1 and sorted(folds) == ["segmentation/0", "segmentation/1"]
    for fold in folds.values():
        assert steps(client, fold.info.run_id, "lr") == [1]


def test_grid_links_its_points(tmp_path, tiny_data):
    """A 2x2 grid (two learning rates x two seeds) with tracking on: one grid run, its
    4 points nested under it, each with its own params and nested CV. The points'
    folds are already on disk, so the grid trains nothing and uploads what they hold."""
    uri = store_uri(tmp_path)
    config = tracked_config(tmp_path, tiny_data, uri)
    args = ["pipeline.grid", "--config", str(config), "--grid", "train.lr=[0.001,0.01]"]
    args += ["--seeds", "2"]
    planned = run_cli(*args, "--dry-run")
    assert planned.returncode == 0, planned.stderr[-3000:]
    names = planned.stdout.split()
    assert len(names) == 4
    for name in names:
        fake_run_dir(tmp_path / "runs" / name, load_config(config).to_dict())
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "experiment tracking is off" not in out.stderr
    client, runs = experiment_runs(uri)
    (grid,) = [r for r in runs if r.info.run_name == "tiny__grid"]
    assert grid.data.tags["foldseg.kind"] == "grid"
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == grid.info.run_id]
    assert sorted(r.info.run_name for r in points) == sorted(names)
    assert sorted(r.data.params["train.lr"] for r in points) == ["0.001", "0.001", "0.01", "0.01"]
    assert all(r.data.metrics["cv.tuned_nested"] == 0.65 for r in points)
    assert {a.path for a in client.list_artifacts(grid.info.run_id)} >= {"results.csv"}


def test_track_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_data):
    uri = store_uri(tmp_path)
    config = tracked_config(tmp_path, tiny_data, uri)
    (tmp_path / "empty").mkdir()
    out = run_cli("pipeline.track", "--config", str(config), str(tmp_path / "empty"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{tmp_path / 'empty'} is not a run directory: no fold_<K>/config.yaml" in out.stderr
    assert not (tmp_path / "store").exists()  # nothing written
