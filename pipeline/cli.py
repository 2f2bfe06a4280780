"""``foldseg``: the front door, one subcommand per stage (``foldseg STAGE --help``).

``foldseg train --config configs/demo.yaml --fold 0`` is ``python -m pipeline.train
--config configs/demo.yaml --fold 0``: the same arguments, the same function, the same
exit codes. The stages are listed in ``core.commands.STAGES``; a stage's module is
imported only when it runs, so ``foldseg --help`` answers at once.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

import pipeline
from pipeline.core.commands import FRONT_DOOR, STAGES, find_stage
from pipeline.run.process import exit_process

EXAMPLES = (
    "run --config configs/demo.yaml",
    "train --config configs/demo.yaml --fold 0",
    "predict --config configs/demo.yaml --set tta.views=[identity,hflip]",
)


def usage() -> str:
    """The front door's help: every stage with its one-line summary, and examples."""
    width = max(len(stage.name) for stage in STAGES)
    lines = [
        f"usage: {FRONT_DOOR} STAGE [--config CONFIG] [--set KEY=VALUE ...] [options]",
        f"       {FRONT_DOOR} STAGE --help",
        f"       {FRONT_DOOR} --version",
        "",
        "k-fold U-Net segmentation for Kaggle-style data sets.",
        "",
        "stages:",
        *(f"  {stage.name:<{width}}  {stage.summary}" for stage in STAGES),
        "",
        "examples:",
        *(f"  {FRONT_DOOR} {example}" for example in EXAMPLES),
        "",
        "Each stage also runs as its module, with the same arguments:",
        *(
            f"  python -m {stage.module:<{width + 9}}  = {FRONT_DOOR} {stage.name}"
            for stage in STAGES
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``foldseg STAGE ARGS`` to the stage's ``main``; return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"{FRONT_DOOR} {pipeline.__version__}")
        return 0
    try:
        stage = find_stage(args[0])
    except ValueError as exc:
        print(f"{FRONT_DOOR}: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(stage.module)
    code: int = module.main(args[1:], prog=f"{FRONT_DOOR} {stage.name}")
    return code


def run() -> None:
    """The console script's entry point.

    A reader that stops early (``foldseg --help | head``) closes the pipe: that ends the
    output quietly, as for any Unix filter, instead of a traceback.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a filter cut short
    exit_process(code)


if __name__ == "__main__":
    run()
