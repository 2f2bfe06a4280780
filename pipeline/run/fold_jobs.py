"""Fold trainings as jobs: child processes here (``train.parallel_folds`` at once) or
Ray tasks on a cluster (``jobs.executor: ray``, ``pipeline.run.ray_jobs``).

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

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import Config, save_config
from pipeline.core.layout import CLASSIFIER_STAGE, JOBS_CONFIG
from pipeline.core.layout import FOLD_METRICS as METRICS
from pipeline.run.executor import Executor, JobExit, LocalExecutor
from pipeline.run.process import JOB_ENV, sigterm_as_interrupt

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


def make_executor(config: Config, workers: int, shared_dir: Path | None = None) -> Executor:
    """The ``jobs.executor`` of ``config``: local child processes or Ray tasks (which
    must see ``shared_dir``, by default the run directory, on every node)."""
    threads = threads_per_job(workers)
    if config.jobs.executor == "ray":
        from pipeline.run.ray_jobs import RayExecutor

        cpus = config.jobs.cpus_per_job or float(threads)
        where = shared_dir or config.run_dir
        return RayExecutor(where, config.jobs.address, cpus, config.jobs.gpus_per_job)
    return LocalExecutor(workers, threads)


def run_commands(
    executor: Executor,
    commands: Sequence[tuple[list[str], Path]],
    on_end: Callable[[int, JobExit, float], None],
    at_once: int | None = None,
    poll_s: float = POLL_S,
) -> None:
    """Run every ``(command, log_path)`` on ``executor`` to its end, ``at_once`` (default
    ``executor.slots``) at a time; one failing does not stop the others. ``on_end(i,
    exit, seconds)`` is called as command ``i`` ends (seconds since it was submitted).
    On an exception (Ctrl-C, or one raised by ``on_end``) the unfinished commands are
    stopped; the executor is closed in any case."""
    waiting = list(enumerate(commands))
    running: list[tuple[int, Any, float]] = []
    limit = at_once or executor.slots
    try:
        while waiting or running:
            for entry in list(running):
                end = executor.poll(entry[1])
                if end is None:
                    continue
                running.remove(entry)
                on_end(entry[0], end, time.perf_counter() - entry[2])
            while waiting and len(running) < limit:
                i, (command, log_path) = waiting.pop(0)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with log_path.open("a") as sink:
                    sink.write(f"$ {' '.join(command)}\n")
                submitted = time.perf_counter()
                running.append((i, executor.start(command, log_path), submitted))
            time.sleep(poll_s)
    finally:
        if running:
            executor.stop([handle for _, handle, _ in running])
        executor.close()


def use_fold_jobs(config: Config, pending: int) -> bool:
    """Whether ``--all`` runs its ``pending`` folds as jobs rather than in this process:
    always on Ray, locally when ``train.parallel_folds`` > 1 and there are several.
    Never inside a fold job (its ``--fold K`` trains here)."""
    if os.environ.get(JOB_ENV) or config.train.strategy == "multi_worker":
        return False  # a multi-worker fold takes the whole cluster: one fold at a time
    if config.jobs.executor == "ray":
        return pending > 0
    return config.train.parallel_folds > 1 and pending > 1


@dataclass
class _Running:
    job: FoldJob
    handle: Any
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
    """Run ``jobs`` (in order, respecting ``after``) on ``jobs.executor``; return those run.

    Locally ``workers`` run at a time, each with ``cores / workers`` threads; on Ray
    every ready job is submitted at once and Ray schedules them by ``jobs.cpus_per_job``
    and ``jobs.gpus_per_job``. Jobs whose fold already finished are skipped unless
    ``force``. The caller makes the experiment's shared inputs (split, image caches)
    first, so that no two jobs build them at once. Raises FoldJobFailed naming the
    failed job and quoting its log.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    pending = [job for job in jobs if force or not is_done(config, job)]
    for job in jobs:
        if job not in pending:
            log.info("%s already finished (%s); skipping", job.name, fold_dir(config, job))
    if not pending:
        return []
    executor = make_executor(config, workers)
    config_path = save_config(config, config.run_dir / JOBS_CONFIG)
    log.info(
        "running %d fold jobs on %s, %d at a time with %d threads each; logs in each fold's %s",
        len(pending),
        config.jobs.executor,
        executor.slots,
        executor.threads,
        LOG_FILE,
    )
    waiting = list(pending)
    running: list[_Running] = []
    finished: list[FoldJob] = []
    try:
        with sigterm_as_interrupt():
            _run_loop(config, executor, waiting, running, finished, config_path, resume, force)
    finally:
        if running:
            executor.stop([entry.handle for entry in running])
            log.info("stopped %s", ", ".join(entry.job.name for entry in running))
        executor.close()
    return finished


def _run_loop(
    config: Config,
    executor: Executor,
    waiting: list[FoldJob],
    running: list[_Running],
    finished: list[FoldJob],
    config_path: Path,
    resume: bool,
    force: bool,
) -> None:
    """Start and watch jobs until every one has finished; FoldJobFailed on a failure."""
    while waiting or running:
        for entry in list(running):
            end = executor.poll(entry.handle)
            entry.forward_progress()
            if end is None:
                continue
            running.remove(entry)
            if end.code != 0:
                how = f"exit code {end.code}" if end.code is not None else end.reason
                raise FoldJobFailed(
                    f"{entry.job.name} failed ({how}); the end of "
                    f"{entry.log_path}:\n{_tail(entry.log_path)}"
                )
            finished.append(entry.job)
            log.info("%s finished in %.0f s", entry.job.name, time.monotonic() - entry.started)
        while len(running) < executor.slots:
            # A job waits for its ``after`` jobs of this run; one outside the run is
            # the child's own business (it fails with its CLI's message if needed).
            active = set(waiting) | {entry.job for entry in running}
            ready = [job for job in waiting if not active.intersection(job.after)]
            if not ready:
                break
            job = ready[0]
            waiting.remove(job)
            running.append(_start(executor, config, job, config_path, resume, force))
        time.sleep(POLL_S)


def _start(
    executor: Executor,
    config: Config,
    job: FoldJob,
    config_path: Path,
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
    process = executor.start(command, log_path)
    log.info("%s started (log: %s)", job.name, log_path)
    return _Running(job, process, log_path, time.monotonic(), start)


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(could not read it: {exc})"
    return "\n".join(text[-lines:])
