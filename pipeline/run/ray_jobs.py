"""Fold jobs as Ray tasks (``jobs.executor: ray``): one task per fold, on any node.

Each task runs the same command as the local pool (``python -m pipeline.train --config
<run>/jobs_config.yaml --fold K``) with the node's own Python, in the driver's working
directory, its output appended to the fold's ``train.log``. So the run directory must be
on storage every node sees at the same path: before the first job, a marker the driver
writes there must be readable by a task on every node, or the run stops with a message
naming the node. The fold lock (``run_lock``) keeps two nodes off one fold.

Ray is optional (``pip install 'foldseg[ray]'``) and imported only here, only when
asked for. ``jobs.address`` null starts a local Ray instance (this machine's cores) for
the run and shuts it down after; an address joins an existing cluster. A task is never
retried by Ray: a failure is reported with the fold's log quoted, and ``--resume``
continues it from its last completed epoch. TensorFlow-free.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_text
from pipeline.run.executor import JobExit, signal_group
from pipeline.run.process import JOB_ENV, THREADS_ENV

log = logging.getLogger(__name__)

POLL_S = 0.2
STOP_WAIT_S = 40  # a cancelled task's child gets this long to stop before a forced kill
PROBE_TIMEOUT_S = 300  # for every node to run the storage probe (a busy cluster queues it)
# The smallest object store Ray accepts; the jobs pass only a few strings.
LOCAL_OBJECT_STORE_BYTES = 80 * 1024 * 1024
INSTALL_HINT = "pip install 'foldseg[ray]'"


def run_command(command: list[str], log_path: str, env: dict[str, str], cwd: str) -> int:
    """In a Ray task: run a job's command (``command[0]`` replaced by this node's Python)
    in ``cwd``, output appended to ``log_path``; return its exit code.

    A cancelled task (``ray.cancel``) gets KeyboardInterrupt here: the job's process
    group is stopped with SIGTERM (a fold saves its last epoch) before it is re-raised.
    """
    full_env = {**os.environ, **env, JOB_ENV: str(os.getpid())}  # dies with this task
    with open(log_path, "ab") as handle:
        process = subprocess.Popen(
            [sys.executable, *command[1:]],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    try:
        # A Python-level wait: a blocking waitpid would not see Ray's KeyboardInterrupt.
        while process.poll() is None:
            time.sleep(POLL_S)
        return int(process.returncode)
    except BaseException:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_WAIT_S - 10)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
        raise


def probe_storage(marker: str, token: str, cwd: str) -> dict[str, str | None]:
    """In a Ray task on one node: what stops a fold job from working there, or None."""
    host = socket.gethostname()
    try:
        seen = Path(marker).read_text()
    except OSError as exc:
        return {"host": host, "problem": f"cannot read {marker} ({exc.strerror or exc})"}
    if seen != token:
        return {"host": host, "problem": f"reads another file at {marker} (not the same storage)"}
    if not os.path.isdir(cwd):
        return {
            "host": host,
            "problem": f"has no directory {cwd} (the driver's working directory, where "
            f"the config's relative paths start)",
        }
    return {"host": host, "problem": None}


class RayExecutor:
    """Fold jobs as Ray tasks with ``cpus`` CPUs (and TensorFlow threads) and ``gpus``
    GPUs each; ``slots``: how many fit on the cluster at once."""

    def __init__(self, run_dir: Path, address: str | None, cpus: float, gpus: float) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError(
                f"jobs.executor is 'ray' but Ray is not installed; install it with "
                f"{INSTALL_HINT}, or set jobs.executor: local"
            ) from None
        self.ray = ray
        self.started_here = False
        if not ray.is_initialized():
            self._init(address)
        try:
            self.slots = self._slots(cpus, gpus)
            self.cwd = os.getcwd()
            check_shared_storage(ray, run_dir, self.cwd)
        except BaseException:
            self.close()
            raise
        self.threads = max(1, int(cpus))
        self.env = {THREADS_ENV: str(self.threads), "OMP_NUM_THREADS": str(self.threads)}
        self.task = ray.remote(run_command).options(
            num_cpus=cpus, num_gpus=gpus, max_retries=0, name="foldseg-fold-job"
        )

    def _init(self, address: str | None) -> None:
        ray = self.ray
        common: dict[str, Any] = {
            "log_to_driver": False,  # each job's output is in its fold's train.log
            "logging_level": logging.WARNING,
            "include_dashboard": False,
        }
        try:
            if address is None:
                ray.init(
                    address="local",  # a new instance, never another run's
                    num_cpus=os.cpu_count() or 1,
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                    **common,
                )
                log.info("started a local Ray instance with %d CPUs", os.cpu_count() or 1)
            else:
                ray.init(address=address, **common)
                log.info("joined the Ray cluster at %s", address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"at jobs.address {address!r}" if address else "locally"
            raise ValueError(f"could not start or reach Ray {where}: {exc}") from None
        self.started_here = True

    def _slots(self, cpus: float, gpus: float) -> int:
        """How many jobs the cluster runs at once; ValueError when no node fits one."""
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        fits = [
            min(
                int(r.get("CPU", 0) // cpus) if cpus else 1 << 30,
                int(r.get("GPU", 0) // gpus) if gpus else 1 << 30,
            )
            for r in nodes
        ]
        if not any(fits):
            largest_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
            largest_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
            raise ValueError(
                f"no Ray node can run a fold job of jobs.cpus_per_job={cpus:g} and "
                f"jobs.gpus_per_job={gpus:g}: the largest node has {largest_cpu:g} CPUs "
                f"and {largest_gpu:g} GPUs"
            )
        return sum(fits)

    def start(self, command: list[str], log_path: Path) -> Any:
        return self.task.remote(command, str(log_path.resolve()), self.env, self.cwd)

    def poll(self, handle: Any) -> JobExit | None:
        ready, _ = self.ray.wait([handle], timeout=0)
        if not ready:
            return None
        try:
            return JobExit(int(self.ray.get(handle)))
        except self.ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return JobExit(None, f"its Ray task ended: {type(exc).__name__}: {first}")

    def stop(self, handles: list[Any]) -> None:
        for handle in handles:
            self.ray.cancel(handle, force=False)  # KeyboardInterrupt in run_command
        _, left = self.ray.wait(handles, num_returns=len(handles), timeout=STOP_WAIT_S)
        for handle in left:
            self.ray.cancel(handle, force=True)

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()
            self.started_here = False


def check_shared_storage(ray: Any, run_dir: Path, cwd: str) -> None:
    """ValueError unless a task on every live node reads a marker written in ``run_dir``
    and finds the driver's working directory ``cwd``."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    run_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    marker = run_dir.resolve() / f".ray-storage-check-{token[:8]}"
    write_text(marker, token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(probe_storage)
        refs = [
            probe.options(
                num_cpus=0,
                max_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(str(marker), token, cwd)
            for n in nodes
        ]
        results = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    finally:
        marker.unlink(missing_ok=True)
    problems = [
        f"node {r['host']} ({n.get('NodeManagerAddress', '?')}) {r['problem']}"
        for r, n in zip(results, nodes, strict=True)
        if r["problem"]
    ]
    if problems:
        raise ValueError(
            f"the run directory {run_dir} must be on storage every Ray node sees at the "
            f"same path (e.g. NFS): " + "; ".join(problems)
        )
    log.info("run directory %s is visible from all %d Ray node(s)", run_dir, len(nodes))
