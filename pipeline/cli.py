"""Shared command-line plumbing: ``--config``/``--set`` arguments and logging setup."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pipeline.config import DEFAULT_CONFIG, Config, load_config


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


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config named by parsed ``--config``/``--set`` arguments."""
    return load_config(args.config, args.overrides)


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


# Set by pipeline.fold_jobs in the environment of the fold processes it starts: a fold
# job, and its TensorFlow thread budget (applied by pipeline.keras_backend).
JOB_ENV = "FOLDSEG_JOB"
THREADS_ENV = "FOLDSEG_THREADS"


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
