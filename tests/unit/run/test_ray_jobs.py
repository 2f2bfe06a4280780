"""Fold jobs on a local Ray instance (2 CPUs), with the stand-in stage modules of
test_fold_jobs (no TensorFlow): scheduling, dependencies, progress, failures, a killed
job resumed, the shared-storage check and the missing-Ray message."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from pipeline.run import fold_jobs, ray_jobs
from pipeline.run.fold_jobs import FoldJob, FoldJobFailed, make_executor, run_fold_jobs
from pipeline.run.ray_jobs import check_shared_storage, probe_storage
from tests.unit.run.test_fold_jobs import _records, stand_in_config

# With KILL_FOLD set, that segmentation fold writes its pid and waits to be killed.
KILLABLE = """
import os, sys, time
from pathlib import Path
kill = os.environ.get("KILL_FOLD")
if kill is not None and "--fold" in sys.argv and sys.argv[sys.argv.index("--fold") + 1] == kill:
    import yaml
    config = yaml.safe_load(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
    run = Path(config["runs_dir"]) / config["experiment"]
    print("waiting to be killed", flush=True)
    (run / "victim.pid").write_text(str(os.getpid()))
    time.sleep(120)
"""


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = stand_in_config(tmp_path, monkeypatch)
    for stage in ("segmentation", "classifier"):
        path = tmp_path / f"stage_{stage}.py"
        path.write_text(KILLABLE + path.read_text())
    # Ray's workers inherit this process's environment (PYTHONPATH to the stand-ins).
    monkeypatch.chdir(tmp_path)
    return config.with_overrides(["jobs.executor=ray", "jobs.cpus_per_job=1"])


pytestmark = pytest.mark.slow


def test_ray_runs_the_jobs_after_their_dependencies_and_forwards_progress(
    setup, caplog: pytest.LogCaptureFixture
) -> None:
    config = setup
    caplog.set_level("INFO", logger="pipeline.run")
    seg = [FoldJob("segmentation", k) for k in range(3)]
    cls = [FoldJob("classifier", k, after=(seg[k],)) for k in range(3)]
    done = run_fold_jobs(config, seg + cls, workers=1, resume=True)
    assert sorted(done, key=lambda j: (j.stage, j.fold)) == sorted(
        seg + cls, key=lambda j: (j.stage, j.fold)
    )
    records = _records(config)
    # Each job got jobs.cpus_per_job threads; Ray ran two at once on its 2 CPUs (the
    # stand-in's rendezvous of segmentation folds 0 and 1 proves they overlapped).
    assert len(records) == 6 and all(r["threads"] == "1" and r["resume"] for r in records)
    assert max(r["concurrent"] for r in records) == 2
    by_job = {(r["stage"], r["fold"]): r for r in records}
    for k in range(3):
        assert by_job[("classifier", k)]["start"] >= by_job[("segmentation", k)]["end"]
    assert "[segmentation fold 2] epoch 1/1 loss=2.5" in caplog.messages
    assert any("visible from all 1 Ray node(s)" in m for m in caplog.messages)
    assert not list(config.run_dir.glob(".ray-storage-check-*"))  # the marker is removed
    assert not ray.is_initialized()  # the local instance it started is shut down
    assert run_fold_jobs(config, seg, workers=1) == []  # finished folds are skipped


def test_a_failed_ray_job_stops_the_others_and_quotes_its_log(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL_FOLD", "1")
    jobs = [FoldJob("segmentation", k) for k in range(2)]
    started = time.monotonic()
    with pytest.raises(FoldJobFailed, match=r"segmentation fold 1 failed \(exit code 3\)") as err:
        run_fold_jobs(setup, jobs, workers=1)
    assert "something broke in this fold" in str(err.value)
    # Fold 0 waits 120 s unless stopped: it was cancelled, not waited for.
    assert time.monotonic() - started < 100
    assert not (setup.fold_dir(0) / "metrics.json").exists()


def test_a_killed_ray_job_fails_the_run_and_resume_finishes_it(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = setup
    monkeypatch.setenv("KILL_FOLD", "1")
    victim = config.run_dir / "victim.pid"

    def kill_when_ready() -> None:
        deadline = time.monotonic() + 120
        while not victim.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(int(victim.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_ready)
    killer.start()
    jobs = [FoldJob("segmentation", k) for k in range(2)]
    with pytest.raises(FoldJobFailed, match=r"segmentation fold 1 failed \(exit code -9\)") as err:
        run_fold_jobs(config, jobs, workers=1)
    killer.join()
    assert "waiting to be killed" in str(err.value)
    monkeypatch.delenv("KILL_FOLD")
    # Fold 0 was stopped too (it waited for fold 1); --resume finishes both.
    assert set(run_fold_jobs(config, jobs, workers=1, resume=True)) == set(jobs)
    assert {r["fold"]: r["resume"] for r in _records(config)} == {0: True, 1: True}


def test_a_job_larger_than_every_node_is_refused(setup) -> None:
    config = setup.with_overrides(["jobs.cpus_per_job=64"])
    with pytest.raises(ValueError, match="no Ray node can run a fold job of jobs.cpus_per_job=64"):
        make_executor(config, 1)
    assert not ray.is_initialized()


def test_the_storage_probe_names_what_a_node_cannot_see(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("token")
    assert probe_storage(str(marker), "token", str(tmp_path))["problem"] is None
    assert "cannot read" in str(
        probe_storage(str(tmp_path / "none"), "t", str(tmp_path))["problem"]
    )
    assert "not the same storage" in str(
        probe_storage(str(marker), "other", str(tmp_path))["problem"]
    )
    missing = probe_storage(str(marker), "token", str(tmp_path / "gone"))["problem"]
    assert "driver's working directory" in str(missing)


def test_a_node_without_the_run_directory_stops_the_run(tmp_path: Path) -> None:
    """A fake two-node cluster whose second node reads nothing: the message names it."""

    class Remote:
        def __init__(self, fn):
            self.fn = fn

        def options(self, **kwargs):
            node = kwargs["scheduling_strategy"].node_id
            if node.startswith("a"):
                return SimpleNamespace(remote=self.fn)
            return SimpleNamespace(remote=lambda *a: {"host": "b", "problem": "cannot read it"})

    fake = SimpleNamespace(
        nodes=lambda: [
            {"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1"},
            {"Alive": True, "NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2"},
        ],
        remote=Remote,
        get=lambda refs, timeout: refs,
    )
    with pytest.raises(ValueError, match=r"node b \(10.0.0.2\) cannot read it"):
        check_shared_storage(fake, tmp_path / "run", str(tmp_path))
    assert not list((tmp_path / "run").iterdir())


def test_without_ray_installed_the_message_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.core.config import DEFAULT_CONFIG, load_config

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    config = load_config(DEFAULT_CONFIG, ["jobs.executor=ray", f"runs_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"Ray is not installed; install it with pip install"):
        make_executor(config, 1)
    assert fold_jobs and ray_jobs  # both modules import without Ray
