"""Where fold jobs run: the ``Executor`` interface every executor implements, how a job
ended (``JobExit``), and the local one (child processes on this machine).

``run.fold_jobs`` drives any executor; ``run.ray_jobs.RayExecutor`` is the other
implementation. Pure run layer: never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.run.process import JOB_ENV, THREADS_ENV


@dataclass
class JobExit:
    """How a job ended: its exit ``code`` (None when it never reported one) and why."""

    code: int | None
    reason: str = ""


class Executor(Protocol):
    """Where fold jobs run: ``start`` one command (output appended to ``log_path``),
    ``poll`` it (None while it runs), ``stop`` the unfinished ones, ``close`` at the end."""

    slots: int  # jobs started at once
    threads: int  # TensorFlow threads of each job

    def start(self, command: list[str], log_path: Path) -> Any: ...

    def poll(self, handle: Any) -> JobExit | None: ...

    def stop(self, handles: list[Any]) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Child processes on this machine, ``slots`` at a time with ``threads`` each."""

    def __init__(self, slots: int, threads: int) -> None:
        self.slots = slots
        self.threads = threads
        self.env = {
            **os.environ,
            THREADS_ENV: str(threads),
            "OMP_NUM_THREADS": str(threads),
            JOB_ENV: str(os.getpid()),  # the child dies with this process (guard_job_process)
        }

    def start(self, command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as handle:
            # Its own process group: a terminal's Ctrl-C reaches the parent only, which
            # stops each job's whole group in order; the job dies with the parent
            # (PDEATHSIG).
            return subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def poll(self, handle: subprocess.Popen[bytes]) -> JobExit | None:
        code = handle.poll()
        return None if code is None else JobExit(code)

    def stop(self, handles: list[subprocess.Popen[bytes]]) -> None:
        for process in handles:
            signal_group(process, signal.SIGTERM)
        for process in handles:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                signal_group(process, signal.SIGKILL)
                process.wait()

    def close(self) -> None:
        """Nothing to release: the processes are stopped or waited for by then."""


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send ``signum`` to the process group of ``process`` (started in a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)
