"""The one runner of every stage command (pure run layer).

A stage declares its command once, as a ``Command``: its arguments and the plain
function that runs it. ``run_command`` does the rest for both forms of the command
(``foldseg STAGE`` and ``python -m pipeline.STAGE``): the parser with its example,
logging, the config with this process on its Keras layer, SIGTERM as an interrupt, and
the exit codes: 0 done, 1 the work itself failed (a fold job, an invalid submission),
2 bad input (one line naming the file, row or key; nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.commands import command_line, find_stage
from pipeline.core.config import DEFAULT_CONFIG, Config, load_config
from pipeline.run.fold_jobs import FoldJobFailed
from pipeline.run.process import enter_framework, guard_job_process, sigterm_as_interrupt

log = logging.getLogger("pipeline")

# What a stage raises for bad input (a missing file, a bad value or key): exit 2.
BAD_INPUT: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError)
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """One stage's command line.

    ``stage``: its front-door name (``core.commands.STAGES``: ``train-classifier``, whose
    module is ``pipeline.train_classifier``); ``description``: the ``--help`` text (the
    module's docstring). ``add_arguments`` adds the stage's own options (after
    ``--config``/``--set`` when ``uses_config``); ``run`` does the work on the parsed
    arguments, prints what a user reads and returns the exit code. ``examples``: argument
    strings shown under ``--help``. ``resume``: the arguments that continue an
    interrupted or failed run (training: ``--all --resume``); without them an interrupted
    command is simply run again (its outputs are atomic). ``bad_input``: the stage's own
    exceptions that mean bad input (exit 2) beside ``BAD_INPUT``; ``failed``: those that
    mean its work failed (exit 1), e.g. an invalid submission.
    """

    stage: str
    description: str | None
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    examples: tuple[str, ...] = ()
    uses_config: bool = True
    resume: str | None = None
    bad_input: tuple[type[Exception], ...] = ()
    failed: tuple[type[Exception], ...] = ()

    @property
    def module(self) -> str:
        """The stage's module (``pipeline.train_classifier``)."""
        return find_stage(self.stage).module

    def main(self, argv: Sequence[str] | None = None, prog: str = "") -> int:
        """The stage's entry point (``foldseg STAGE`` and ``python -m``): ``run_command``."""
        return run_command(self, argv, prog)


def run_command(command: Command, argv: Sequence[str] | None = None, prog: str = "") -> int:
    """Parse ``argv``, run ``command`` and return its exit code (never raises for bad input).

    ``prog``: how the user called it (``foldseg train``); default ``python -m <module>``.
    """
    parser = make_parser(command, prog or f"python -m {command.module}")
    args = parser.parse_args(argv)
    setup_logging(bool(getattr(args, "verbose", False)))
    guard_job_process()
    try:
        with sigterm_as_interrupt():
            return command.run(args)
    except FoldJobFailed as exc:
        hint = f" with {command.resume}" if command.resume else ""
        log.error("%s\nfix the cause, then run the same command again%s", exc, hint)
        return EXIT_FAILED
    except command.failed as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    except BAD_INPUT + command.bad_input as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        config = getattr(args, "config", None) if command.uses_config else None
        if command.resume is not None:
            again = command_line(command.stage, command.resume, config=config)
            log.error(
                "interrupted: every fold keeps its last completed epoch; continue with %s", again
            )
        else:
            again = command_line(command.stage, config=config)
            log.error(
                "interrupted: outputs are written atomically, so nothing is half-written; "
                "run %s again",
                again,
            )
        return EXIT_INTERRUPTED


def make_parser(command: Command, prog: str) -> argparse.ArgumentParser:
    """The parser of ``command``: its description, its options, its examples."""
    examples = "\n".join(f"  {prog} {example}" for example in command.examples)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(command.description or "").strip() or None,
        epilog=f"examples:\n{examples}" if examples else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command.uses_config:
        add_config_arguments(parser)
    command.add_arguments(parser)
    return parser


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
    add_submissions_dir_argument(parser)


def add_submissions_dir_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--submissions-dir``: where submissions and their history go."""
    parser.add_argument(
        "--submissions-dir",
        type=Path,
        default=Path("submissions"),
        help="folder of <experiment>_<yyyymmdd-hhmm>.csv and history.md (default: %(default)s)",
    )


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force``: go on although the config differs from the folds' training config."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="go on although this config differs from the one the folds were trained with",
    )


def add_fold_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fold K`` / ``--all`` (exactly one), ``--resume`` and ``--force``."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--fold", type=int, help="fold index to train")
    group.add_argument("--all", action="store_true", help="train every fold in turn")
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted fold from its checkpoint"
    )
    parser.add_argument(
        "--force", action="store_true", help="retrain a fold even if it already finished"
    )
    parser.add_argument(
        "--logical-cpus",
        type=int,
        default=0,
        help="split the CPU into N logical devices (to exercise the multi-device path)",
    )


def parse_size(text: str) -> tuple[int, int]:
    """An ``HxW`` option (``80x120``) as ``(H, W)``; argparse reports a bad one (exit 2)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected HxW with positive integers, e.g. 350x525; got {text!r}"
        )
    return int(parts[0]), int(parts[1])


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config named by parsed ``--config``/``--set`` arguments, with this
    process on the config's Keras layer (``process.enter_framework``)."""
    config = load_config(args.config, args.overrides)
    enter_framework(config)
    return config


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps; called once per command."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
