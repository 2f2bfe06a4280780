"""One fold across two worker processes (train.strategy: multi_worker, TF_CONFIG on
127.0.0.1, CPU): both end with identical weights, only the chief writes the fold."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import REPO, write_tiny_config

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(
            lambda name, item: (
                out.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
        )
    return out


def start_workers(config: Path, scratch: Path, extra: list[str]) -> list[subprocess.Popen]:
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    for index in (0, 1):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
            "FOLDSEG_WORKER_DIR": str(scratch),
            "FOLDSEG_THREADS": "1",
        }
        command = [sys.executable, "-m", "pipeline.train", "--config", str(config), "--fold", "0"]
        processes.append(
            subprocess.Popen(
                [*command, "--set", "train.strategy=multi_worker", *extra],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def test_two_workers_train_one_fold_with_identical_weights(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, train={"epochs": 2, "accumulation_steps": 1})
    scratch = tmp_path / "worker_scratch"
    workers = start_workers(config, scratch, [])
    outs = [p.communicate(timeout=600) for p in workers]
    for process, (_, err) in zip(workers, outs, strict=True):
        assert process.returncode == 0, err[-3000:]
    fold = tmp_path / "runs" / "tiny" / "fold_0"
    metrics = json.loads((fold / "metrics.json").read_text())
    # The global batch spans both workers: 2 replicas.
    assert metrics["workers"] == 2 and metrics["replicas"] == 2
    assert "worker 1 done; the chief writes the fold's outputs" in outs[1][1]
    chief, worker = (
        h5_arrays(fold / "best_weights.h5"),
        h5_arrays(scratch / "fold_0" / "best_weights.h5"),
    )
    assert chief.keys() == worker.keys() and len(chief) > 50
    for name, value in chief.items():
        np.testing.assert_array_equal(value, worker[name], err_msg=name)
    # The worker wrote its own copies to its scratch directory and nothing else: the
    # fold's OOF and metrics exist once, in the chief's fold directory.
    assert (scratch / "fold_0" / "history.csv").is_file()
    assert not (scratch / "fold_0" / "metrics.json").exists()
    assert not (scratch / "fold_0" / "oof").exists()
    assert (fold / "oof").is_dir() and (fold / "history.csv").is_file()
    assert not list((tmp_path / "runs").rglob("*.tmp*"))


def test_after_a_worker_dies_both_resume_from_the_chiefs_checkpoint(tmp_path, tiny_data):
    config = write_tiny_config(tmp_path, tiny_data, train={"epochs": 4, "accumulation_steps": 1})
    scratch = tmp_path / "worker_scratch"
    fold = tmp_path / "runs" / "tiny" / "fold_0"
    workers = start_workers(config, scratch, [])
    state = fold / "checkpoint" / "state.json"
    deadline = time.monotonic() + 400
    while not state.is_file():  # the chief published epoch 1
        assert time.monotonic() < deadline and workers[0].poll() is None, "no epoch completed"
        time.sleep(0.2)
    workers[1].send_signal(signal.SIGKILL)
    try:
        workers[0].communicate(timeout=120)  # the chief loses its peer and stops
    except subprocess.TimeoutExpired:
        workers[0].send_signal(signal.SIGTERM)
        workers[0].communicate(timeout=60)
    workers[1].communicate()
    assert not (fold / "metrics.json").exists()
    done = json.loads(state.read_text())["epoch"]
    assert 1 <= done < 4

    again = start_workers(config, scratch, ["--resume"])
    outs = [p.communicate(timeout=600) for p in again]
    for process, (_, err) in zip(again, outs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert f"resumed from epoch {done}" in outs[0][1] and f"resumed from epoch {done}" in outs[1][1]
    history = (fold / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3", "4"]
    chief, worker = (
        h5_arrays(fold / "best_weights.h5"),
        h5_arrays(scratch / "fold_0" / "best_weights.h5"),
    )
    for name, value in chief.items():
        np.testing.assert_array_equal(value, worker[name], err_msg=name)
