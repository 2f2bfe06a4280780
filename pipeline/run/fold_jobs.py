"""Fold trainings as child processes, several at once (``train.parallel_folds``).

On a CPU, small models do not keep every core busy (and graph tracing is one thread),
so running folds side by side, each with ``cores / N`` TensorFlow threads, finishes a
cross-validation sooner: on 2 cores, two demo folds at once took 15 s per epoch pair
against 2 x 11 s one after the other. Each job is ``python -m pipeline.train`` or
``pipeline.train_classifier`` on the experiment's saved config, so a job behaves
exactly as its CLI (resume, outputs, metrics); its output goes to ``train.log`` in
its fold directory. A job that fails stops the others (they resume with ``--resume``)
and the error quotes the end of its log.

Orchestration layer, TensorFlow-free: the parent only launches and watches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import Config, save_config
from pipeline.core.layout import CLASSIFIER_STAGE, JOBS_CONFIG
from pipeline.core.layout import FOLD_METRICS as METRICS
from pipeline.run.cli import JOB_ENV, THREADS_ENV, sigterm_as_interrupt

log = logging.getLogger(__name__)

STAGES = {"segmentation": "pipeline.train", "classifier": "pipeline.train_classifier"}
LOG_FILE = "train.log"
TAIL_LINES = 25
POLL_S = 0.5
PROGRESS_MARK = " pipeline.nn.trainer: "


class FoldJobFailed(RuntimeError):
    """A fold job exited with an error; the message quotes its log."""


@dataclass(frozen=True)
class FoldJob:
    """One fold of one stage; ``after``: jobs that must finish first."""

    stage: str
    fold: int
    after: tuple[FoldJob, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {sorted(STAGES)}; got {self.stage!r}")

    @property
    def name(self) -> str:
        return f"{self.stage} fold {self.fold}"


def fold_dir(config: Config, job: FoldJob) -> Path:
    """Where the job's CLI writes (``fold_<k>`` or ``classifier/fold_<k>``)."""
    stage = CLASSIFIER_STAGE if job.stage == "classifier" else ""
    return config.fold_dir(job.fold, stage)


def is_done(config: Config, job: FoldJob) -> bool:
    return (fold_dir(config, job) / METRICS).is_file()


def threads_per_job(workers: int, cores: int | None = None) -> int:
    """TensorFlow threads for each of ``workers`` simultaneous jobs."""
    return max(1, (cores or os.cpu_count() or 1) // workers)


def job_command(job: FoldJob, config_path: Path, resume: bool, force: bool) -> list[str]:
    command = [sys.executable, "-m", STAGES[job.stage], "--config", str(config_path)]
    command += ["--fold", str(job.fold)]
    if resume:
        command.append("--resume")
    if force:
        command.append("--force")
    return command


@dataclass
class _Running:
    job: FoldJob
    process: subprocess.Popen[bytes]
    log_path: Path
    started: float
    read_to: int = 0  # how far the log has been scanned for progress lines

    def forward_progress(self) -> None:
        """Log the job's new per-epoch summary lines (``pipeline.nn.trainer: epoch ...``)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self.read_to)
                new = handle.read()
        except OSError:
            return
        complete = new.rfind(b"\n") + 1  # leave a half-written line for next time
        self.read_to += complete
        for line in new[:complete].decode(errors="replace").splitlines():
            if PROGRESS_MARK in line:
                log.info("[%s] %s", self.job.name, line.split(PROGRESS_MARK, 1)[1].strip())


def run_fold_jobs(
    config: Config,
    jobs: Sequence[FoldJob],
    workers: int,
    resume: bool = False,
    force: bool = False,
) -> list[FoldJob]:
    """Run ``jobs`` (in order, respecting ``after``) ``workers`` at a time; return those run.

    Jobs whose fold already finished are skipped unless ``force``. The caller makes
    the experiment's shared inputs (split, image caches) first, so that no two
    children build them at once. Raises RuntimeError naming the failed job and
    quoting its log.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    pending = [job for job in jobs if force or not is_done(config, job)]
    for job in jobs:
        if job not in pending:
            log.info("%s already finished (%s); skipping", job.name, fold_dir(config, job))
    if not pending:
        return []
    config_path = save_config(config, config.run_dir / JOBS_CONFIG)
    threads = threads_per_job(workers)
    env = {
        **os.environ,
        THREADS_ENV: str(threads),
        "OMP_NUM_THREADS": str(threads),
        JOB_ENV: str(os.getpid()),  # the child dies with this process (guard_job_process)
    }
    log.info(
        "running %d fold jobs, %d at a time with %d threads each; logs in each fold's %s",
        len(pending),
        workers,
        threads,
        LOG_FILE,
    )
    waiting = list(pending)
    running: list[_Running] = []
    finished: list[FoldJob] = []
    try:
        with sigterm_as_interrupt():
            _run_loop(config, waiting, running, finished, workers, config_path, env, resume, force)
    finally:
        _stop(running)
    return finished


def _run_loop(
    config: Config,
    waiting: list[FoldJob],
    running: list[_Running],
    finished: list[FoldJob],
    workers: int,
    config_path: Path,
    env: dict[str, str],
    resume: bool,
    force: bool,
) -> None:
    """Start and watch jobs until every one has finished; FoldJobFailed on a failure."""
    while waiting or running:
        for entry in list(running):
            code = entry.process.poll()
            entry.forward_progress()
            if code is None:
                continue
            running.remove(entry)
            if code != 0:
                raise FoldJobFailed(
                    f"{entry.job.name} failed (exit code {code}); the end of "
                    f"{entry.log_path}:\n{_tail(entry.log_path)}"
                )
            finished.append(entry.job)
            log.info("%s finished in %.0f s", entry.job.name, time.monotonic() - entry.started)
        while len(running) < workers:
            # A job waits for its ``after`` jobs of this run; one outside the run is
            # the child's own business (it fails with its CLI's message if needed).
            active = set(waiting) | {entry.job for entry in running}
            ready = [job for job in waiting if not active.intersection(job.after)]
            if not ready:
                break
            job = ready[0]
            waiting.remove(job)
            running.append(_start(config, job, config_path, env, resume, force))
        time.sleep(POLL_S)


def _stop(running: list[_Running]) -> None:
    """After a failure, Ctrl-C or SIGTERM: stop every job's process group (they resume
    later from their last completed epoch)."""
    for entry in running:
        _signal_group(entry.process, signal.SIGTERM)
    for entry in running:
        try:
            entry.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(entry.process, signal.SIGKILL)
            entry.process.wait()
    if running:
        log.info("stopped %s", ", ".join(entry.job.name for entry in running))


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _start(
    config: Config,
    job: FoldJob,
    config_path: Path,
    env: dict[str, str],
    resume: bool,
    force: bool,
) -> _Running:
    directory = fold_dir(config, job)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / LOG_FILE
    command = job_command(job, config_path, resume, force)
    with log_path.open("ab") as handle:
        handle.write(f"$ {' '.join(command)}\n".encode())
        handle.flush()
        start = handle.tell()
        # Its own process group: a terminal's Ctrl-C reaches the parent only, which stops
        # each job's whole group in order; the job dies with the parent (PDEATHSIG).
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    log.info("%s started (log: %s)", job.name, log_path)
    return _Running(job, process, log_path, time.monotonic(), start)


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(could not read it: {exc})"
    return "\n".join(text[-lines:])
