"""pipeline.run.fold_jobs with stand-in stage modules (no TensorFlow): scheduling, skips,
dependencies, thread budget and failures."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import DEFAULT_CONFIG, ConfigError, load_config
from pipeline.run import fold_jobs
from pipeline.run.fold_jobs import FoldJob, job_command, run_fold_jobs, threads_per_job

# A stand-in for python -m pipeline.train / train_classifier: records how many jobs ran
# at once and with which thread budget, writes metrics.json. No test depends on speed:
# - segmentation folds 0 and 1 wait for each other to have started (a rendezvous), so
#   two jobs provably run at once;
# - with FAIL_FOLD set, that fold fails at once and every other job waits to be
#   stopped by the runner (for at most WAIT_S), so nothing can finish in between.
STAGE = textwrap.dedent(
    """
    import argparse, json, os, sys, time
    from pathlib import Path
    import yaml
    WAIT_S = 120
    parser = argparse.ArgumentParser()
    parser.add_argument("--config"); parser.add_argument("--fold", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    run = Path(config["runs_dir"]) / config["experiment"]
    stage = "{stage}"
    name = f"{{stage}}_{{args.fold}}"
    out = (run / "classifier" if stage == "classifier" else run) / f"fold_{{args.fold}}"
    (run / "started").mkdir(exist_ok=True)
    (run / "running").mkdir(exist_ok=True)
    (run / "started" / name).touch()
    (run / "running" / name).touch()
    start = time.time()
    print(f"{{stage}} fold {{args.fold}} starting", flush=True)
    print(f"12:00:00 INFO pipeline.nn.trainer: epoch 1/1 loss={{args.fold}}.5", flush=True)
    fail = os.environ.get("FAIL_FOLD")
    if fail is not None:
        if str(args.fold) == fail and stage == "segmentation":
            print("something broke in this fold", flush=True)
            sys.exit(3)
        time.sleep(WAIT_S)
    if stage == "segmentation" and args.fold in (0, 1):
        other = run / "started" / f"segmentation_{{1 - args.fold}}"
        deadline = time.time() + WAIT_S
        while not other.exists() and time.time() < deadline:
            time.sleep(0.01)
    concurrent = len(list((run / "running").iterdir()))
    record = {{"stage": stage, "fold": args.fold, "start": start, "end": time.time(),
              "threads": os.environ.get("FOLDSEG_THREADS"), "resume": args.resume,
              "concurrent": concurrent}}
    with (run / "runs.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\\n")
    (out / "metrics.json").write_text(json.dumps({{"fold": args.fold}}))
    (run / "running" / name).unlink()
    """
)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    return stand_in_config(tmp_path, monkeypatch)


def stand_in_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A config whose fold jobs run the stand-in stages (written to ``tmp_path``)."""
    for stage in ("segmentation", "classifier"):
        (tmp_path / f"stage_{stage}.py").write_text(STAGE.format(stage=stage))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(
        fold_jobs,
        "STAGES",
        {"segmentation": "stage_segmentation", "classifier": "stage_classifier"},
    )
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"base": str(DEFAULT_CONFIG), "experiment": "jobs", "runs_dir": str(tmp_path)}
        )
    )
    config = load_config(path)
    config.run_dir.mkdir(parents=True)
    return config


def _records(config) -> list[dict]:
    lines = (config.run_dir / "runs.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_jobs_run_two_at_a_time_in_order_after_their_dependencies(
    setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = setup
    caplog.set_level("INFO", logger="pipeline.run.fold_jobs")
    monkeypatch.setattr(fold_jobs.os, "cpu_count", lambda: 4)
    seg = [FoldJob("segmentation", k) for k in range(3)]
    cls = [FoldJob("classifier", k, after=(seg[k],)) for k in range(3)]
    done = run_fold_jobs(config, seg + cls, workers=2, resume=True)
    assert sorted(done, key=lambda j: (j.stage, j.fold)) == sorted(
        seg + cls, key=lambda j: (j.stage, j.fold)
    )
    records = _records(config)
    assert len(records) == 6 and all(r["threads"] == "2" and r["resume"] for r in records)
    # Never more than two at once, and two did run together (the rendezvous).
    assert max(r["concurrent"] for r in records) == 2
    by_job = {(r["stage"], r["fold"]): r for r in records}
    for k in range(3):
        assert by_job[("classifier", k)]["start"] >= by_job[("segmentation", k)]["end"]
    logs = (config.fold_dir(0, "classifier") / "train.log").read_text()
    assert "--fold 0 --resume" in logs and "classifier fold 0 starting" in logs
    # Each job's epoch summaries are forwarded, named.
    assert "[segmentation fold 2] epoch 1/1 loss=2.5" in caplog.messages
    assert "[classifier fold 0] epoch 1/1 loss=0.5" in caplog.messages

    # Finished folds are skipped; force runs them again.
    assert run_fold_jobs(config, seg, workers=2) == []
    assert run_fold_jobs(config, seg[:1], workers=2, force=True) == seg[:1]


def test_a_failed_job_stops_the_run_and_quotes_its_log(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = setup
    monkeypatch.setenv("FAIL_FOLD", "1")
    jobs = [FoldJob("segmentation", k) for k in range(2)] + [FoldJob("classifier", 5)]
    with pytest.raises(RuntimeError, match=r"segmentation fold 1 failed \(exit code 3\)") as err:
        run_fold_jobs(config, jobs, workers=2)
    assert "something broke in this fold" in str(err.value)
    assert not (config.fold_dir(5, "classifier") / "metrics.json").exists()  # never started
    # Fold 0 was still waiting: the runner stopped it rather than waiting for it.
    assert not (config.fold_dir(0) / "metrics.json").exists()
    assert not (config.run_dir / "runs.jsonl").exists()


def test_threads_commands_and_config() -> None:
    assert threads_per_job(2, cores=2) == 1
    assert threads_per_job(3, cores=16) == 5
    assert threads_per_job(4, cores=2) == 1
    command = job_command(FoldJob("classifier", 2), Path("c.yaml"), resume=True, force=False)
    assert command[1:] == [
        "-m",
        "pipeline.train_classifier",
        "--config",
        "c.yaml",
        "--fold",
        "2",
        "--resume",
    ]
    with pytest.raises(ValueError, match="stage must be one of"):
        FoldJob("tuning", 0)
    with pytest.raises(ConfigError, match="train.parallel_folds' must be an integer >= 1"):
        load_config(DEFAULT_CONFIG, ["train.parallel_folds=0"])
