"""Fold jobs benchmark: the demo's 6 fold jobs through the local pool and through Ray.

Usage: ``python benchmarks/bench_jobs.py [--epochs E] [--trivial N] [--workdir DIR]
[--quick] [--no-record]``

Two measurements, both executors in the same run on this machine:

1. **Overhead**: ``N`` trivial jobs (a Python process that exits at once) on each
   executor, 2 at a time: Ray's start (a local instance and the shared-storage probe) and
   the median time from submitting a job to its end, against the local pool's.
2. **The demo's fold jobs**: 3 segmentation + 3 classifier folds of
   ``configs/demo.yaml`` (``--epochs`` overrides both stages' epochs), trained from
   scratch by ``run_parallel`` with ``jobs.executor`` local and ray, each on its own
   experiment and a shared, already built image cache. It prints both wall times, their
   ratio and whether the OOF figures agree.

The last line is one JSON object, also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import describe_machine, record  # noqa: E402
from pipeline.core.config import CONFIG_DIR, Config, load_config  # noqa: E402
from pipeline.run.fold_jobs import (  # noqa: E402
    FoldJob,
    JobExit,
    LocalExecutor,
    run_commands,
    threads_per_job,
)

EXECUTORS = ("local", "ray")


def trivial_jobs(run_dir: Path, executor: str, n: int) -> dict[str, float]:
    """Start-up and per-job latency of ``n`` jobs that do nothing, 2 at a time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if executor == "ray":
        from pipeline.run.ray_jobs import RayExecutor

        runner: Any = RayExecutor(run_dir, None, 1.0, 0.0)
    else:
        runner = LocalExecutor(2, threads_per_job(2))
    start_s = time.perf_counter() - started
    latencies: list[float] = []

    def ended(i: int, end: JobExit, seconds: float) -> None:
        if end.code != 0:
            raise RuntimeError(f"a trivial {executor} job failed: {end}")
        latencies.append(seconds)

    command = [sys.executable, "-c", "pass"]
    clock = time.perf_counter()
    jobs = [(command, run_dir / f"job_{k}.log") for k in range(n)]
    run_commands(runner, jobs, ended, at_once=2, poll_s=0.01)
    return {
        "start_s": round(start_s, 2),
        "jobs_s": round(time.perf_counter() - clock, 2),
        "median_job_s": round(statistics.median(latencies), 3),
    }


def demo_config(workdir: Path, executor: str, epochs: int | None) -> Config:
    data = workdir / "data"
    if not (data / "train.csv").is_file():
        from pipeline.make_demo_data import main as make_demo

        make_demo(["--out", str(data)])
    overrides = [
        f"experiment=bench_jobs_{executor}",
        f"runs_dir={workdir / 'runs'}",
        f"data.train_csv={data / 'train.csv'}",
        f"data.train_images={data / 'train_images'}",
        f"data.test_images={data / 'test_images'}",
        f"data.sample_submission={data / 'sample_submission.csv'}",
        f"data.test_truth={data / 'test_truth.csv'}",
        f"data.cache_dir={workdir / 'cache'}",
        f"jobs.executor={executor}",
        "train.verbose=0",
    ]
    if epochs is not None:
        overrides += [f"train.epochs={epochs}", f"classifier.epochs={epochs}"]
    return load_config(CONFIG_DIR / "demo.yaml", overrides)


def demo_jobs(workdir: Path, executor: str, epochs: int | None) -> dict[str, Any]:
    """Train the demo's 6 fold jobs from scratch on ``executor``; wall time and figures."""
    from pipeline.nn.fold_trainer import run_parallel
    from pipeline.run.fold_records import read_fold_metrics

    config = demo_config(workdir, executor, epochs)
    folds = list(range(config.folds.n_splits))
    jobs = [FoldJob("segmentation", k) for k in folds]
    jobs += [FoldJob("classifier", k) for k in folds]
    sizes = [config.data.image_size, config.classifier.image_size]
    started = time.perf_counter()
    run_parallel(config, jobs, sizes, resume=False, force=True)
    seconds = time.perf_counter() - started
    seg = [read_fold_metrics(config.fold_dir(k), "train") for k in folds]
    cls = [read_fold_metrics(config.fold_dir(k, "classifier"), "train_classifier") for k in folds]
    return {
        "wall_s": round(seconds, 1),
        "oof_kaggle_dice_050": [round(m["oof_kaggle_dice_050"], 4) for m in seg],
        "classifier_oof_auc": [
            round(sum(m["oof_auc_per_class"].values()) / len(m["oof_auc_per_class"]), 4)
            for m in cls
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="both stages' epochs")
    parser.add_argument("--trivial", type=int, default=12, help="trivial jobs per executor")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/foldseg_bench_jobs"))
    parser.add_argument("--quick", action="store_true", help="2 epochs, 6 trivial jobs")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.trivial = 2, 6
    from pipeline.run.command import setup_logging

    setup_logging()
    overhead = {e: trivial_jobs(args.workdir / f"trivial_{e}", e, args.trivial) for e in EXECUTORS}
    print(f"trivial jobs: {json.dumps(overhead)}", flush=True)
    # One cache for both runs, built before either is timed.
    demo = {}
    for executor in EXECUTORS:
        demo[executor] = demo_jobs(args.workdir, executor, args.epochs)
        print(f"demo fold jobs on {executor}: {json.dumps(demo[executor])}", flush=True)
    local, ray = demo["local"], demo["ray"]
    result = {
        "benchmark": "jobs",
        "machine": describe_machine(),
        "settings": {"epochs": args.epochs or "demo", "trivial_jobs": args.trivial},
        "trivial_jobs": overhead,
        "ray_start_s": overhead["ray"]["start_s"],
        "ray_vs_local_job_latency": round(
            overhead["ray"]["median_job_s"] / overhead["local"]["median_job_s"], 2
        ),
        "ray_overhead_per_job_s": round(
            overhead["ray"]["median_job_s"] - overhead["local"]["median_job_s"], 3
        ),
        "demo_fold_jobs": demo,
        "demo_ray_vs_local_wall": round(ray["wall_s"] / local["wall_s"], 3),
        "same_figures": local["oof_kaggle_dice_050"] == ray["oof_kaggle_dice_050"]
        and local["classifier_oof_auc"] == ray["classifier_oof_auc"],
    }
    record(result, keep=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
