"""Shared command-line plumbing: ``--config``/``--set`` arguments and logging setup."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.config import DEFAULT_CONFIG, Config, load_config
from pipeline.core.schema import FRAMEWORKS


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``--config`` and repeatable ``--set key.path=value`` options."""
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)",
    )


def add_submission_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--out`` and ``--submissions-dir`` (the stages that write a submission)."""
    parser.add_argument("--out", type=Path, help="submission file (default: see --submissions-dir)")
    parser.add_argument(
        "--submissions-dir",
        type=Path,
        default=Path("submissions"),
        help="folder of <experiment>_<yyyymmdd-hhmm>.csv and history.md (default: %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config named by parsed ``--config``/``--set`` arguments, with this
    process on the config's Keras layer (``enter_framework``)."""
    config = load_config(args.config, args.overrides)
    enter_framework(config)
    return config


def enter_framework(config: Config) -> None:
    """Run this process on the Keras layer the config names (key ``framework``).

    The door module picks its Keras once, at its import (``FOLDSEG_FRAMEWORK``). Before
    that import the variable is simply set; a stage command that has already imported
    the other Keras restarts itself once with the variable set (its fold jobs inherit
    it). A process that cannot restart (a library caller) gets a clear error instead.
    """
    wanted = str(config.framework)
    if wanted == framework_of_process():
        return
    if _DOOR not in sys.modules:
        os.environ[FRAMEWORK_ENV] = wanted
        return
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.startswith("pipeline."):  # a stage command
        os.environ[FRAMEWORK_ENV] = wanted
        logging.getLogger(__name__).info("framework %s: restarting on it", wanted)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    raise ValueError(
        f"{config.source or 'the config'}: framework {wanted!r}, but this process already "
        f"runs {framework_of_process()!r}; set {FRAMEWORK_ENV}={wanted} before starting it"
    )


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force``: go on although the config differs from the folds' training config."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="go on although this config differs from the one the folds were trained with",
    )


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps; called once in each ``main``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def parse_fold_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse ``--fold K`` / ``--all`` (exactly one), ``--resume`` and ``--force``."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--fold", type=int, help="fold index to train")
    group.add_argument("--all", action="store_true", help="train every fold in turn")
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted fold from its checkpoint"
    )
    parser.add_argument(
        "--force", action="store_true", help="retrain a fold even if it already finished"
    )
    return parser.parse_args(argv)


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


def report_interrupted(command: str) -> int:
    """The one line an interrupted stage (not a training) prints; the exit code (130)."""
    logging.getLogger("pipeline").error(
        "interrupted: outputs are written atomically, so nothing is half-written; run %s again",
        command,
    )
    return 130


def report_interrupt(command: str) -> int:
    """The one line a stopped training prints; the exit code (130)."""
    logging.getLogger("pipeline").error(
        "interrupted: every fold keeps its last completed epoch; continue with %s --resume",
        command,
    )
    return 130


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
