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
