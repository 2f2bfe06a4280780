"""This process and the processes it starts: the environment a fold job inherits, the
Keras layer it runs, dying with its parent, SIGTERM as an interrupt and a fast exit.

Pure run layer: never imports TensorFlow.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.commands import FRONT_DOOR
from pipeline.core.config import Config
from pipeline.core.schema import FRAMEWORKS

# Set by pipeline.run.fold_jobs in the environment of the fold processes it starts: a fold
# job (its value: the parent's pid), and its TensorFlow thread budget (applied by
# pipeline.nn.keras_backend).
JOB_ENV = "FOLDSEG_JOB"
THREADS_ENV = "FOLDSEG_THREADS"
# The Keras layer of this process (pipeline.nn.keras_backend): tf_keras | keras3.
FRAMEWORK_ENV = "FOLDSEG_FRAMEWORK"
_DOOR = "pipeline.nn.keras_backend"


def framework_of_process() -> str:
    """The Keras layer this process runs (``FOLDSEG_FRAMEWORK``, default tf_keras)."""
    name = os.environ.get(FRAMEWORK_ENV) or FRAMEWORKS[0]
    if name not in FRAMEWORKS:
        raise ValueError(f"{FRAMEWORK_ENV}={name!r}: expected one of {', '.join(FRAMEWORKS)}")
    return name


def enter_framework(config: Config) -> None:
    """Run this process on the Keras layer the config names (key ``framework``).

    The door module picks its Keras once, at its import (``FOLDSEG_FRAMEWORK``). Before
    that import the variable is simply set; a command process (``foldseg STAGE`` or
    ``python -m pipeline.STAGE``) that has already imported the other Keras restarts
    itself once with the variable set (its fold jobs inherit it). A process that cannot
    restart (a library caller) gets a clear error instead.
    """
    wanted = str(config.framework)
    if wanted == framework_of_process():
        return
    if _DOOR not in sys.modules:
        os.environ[FRAMEWORK_ENV] = wanted
        return
    if _started_as_command():
        os.environ[FRAMEWORK_ENV] = wanted
        logging.getLogger(__name__).info("framework %s: restarting on it", wanted)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    raise ValueError(
        f"{config.source or 'the config'}: framework {wanted!r}, but this process already "
        f"runs {framework_of_process()!r}; set {FRAMEWORK_ENV}={wanted} before starting it"
    )


def _started_as_command() -> bool:
    """Whether this interpreter was started as a command (``python -m pipeline.X`` or the
    ``foldseg`` script), which may restart itself; a library caller (a test, a notebook)
    may not."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.startswith("pipeline."):
        return True
    return Path(sys.argv[0]).name == FRONT_DOOR


_PR_SET_PDEATHSIG = 1


def guard_job_process() -> None:
    """In a fold job: die with the parent, even when it is killed with SIGKILL.

    Linux's ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` asks the kernel to send SIGTERM when
    the parent exits; a parent that died before this call is caught by comparing the
    current parent pid with the one the parent recorded. Elsewhere, nothing to do.
    """
    parent = os.environ.get(JOB_ENV, "")
    if not parent.isdigit():
        return
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the parent's own cleanup still stops us
    if os.getppid() != int(parent):
        os._exit(143)  # the parent is already gone


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that cleanup code runs."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Interrupted`` (cleanup runs) in the main thread."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_process(code: int) -> None:
    """``sys.exit(code)``; a fold job (``FOLDSEG_JOB`` set) skips interpreter teardown.

    Tearing down TensorFlow took 4-24 s after a fold had finished, time a waiting fold
    could use. Every output is written and closed by then; logs and streams are flushed.
    """
    if os.environ.get(JOB_ENV):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
