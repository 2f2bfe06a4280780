"""Check and score a Kaggle submission file from the command line.

CLI (``foldseg submission`` or ``python -m pipeline.submission``)::

    foldseg submission check FILE --sample SAMPLE (--shape HxW | --images DIR)
    foldseg submission score FILE --truth TRUTH (--shape HxW | --images DIR)

Exit status: 0 valid (and scored), 1 invalid (the message names the row), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.core.formats import detect_csv_format
from pipeline.core.images import read_image_size, resolve_image_path
from pipeline.core.submission import score_submission
from pipeline.core.submission_check import (
    Shapes,
    SubmissionError,
    _split_keys,
    positive_rates,
    read_submission,
    validate_submission,
)
from pipeline.run.command import Command, parse_size


def _cli_shapes(args: argparse.Namespace, images: list[str]) -> Shapes:
    """The fixed ``--shape``, or each image's size read from the ``--images`` folder."""
    if args.shape is not None:
        return tuple(args.shape)
    return {
        image_id: read_image_size(resolve_image_path(args.images, image_id)) for image_id in images
    }


def _keys_of(frame: pd.DataFrame, csv_format: str, where: str) -> tuple[list[str], list[str]]:
    """Image ids and class names of a reference file, in order of first appearance."""
    images, names = _split_keys(frame, csv_format, where)
    return list(pd.unique(images)), list(pd.unique(names))


def _run_check(args: argparse.Namespace) -> None:
    """``check``: validate FILE against the sample's images and classes; print rates."""
    frame = read_submission(args.file)
    csv_format = _detect(frame, args.file)
    images, classes = _keys_of(
        read_submission(args.sample), csv_format, f"sample {str(args.sample)!r}"
    )
    if csv_format == "instances":
        classes = ["object"]
    if args.classes:
        classes = args.classes.split(",")
    shapes = _cli_shapes(args, images)
    validate_submission(
        frame, csv_format, classes, images, shapes, f"submission {str(args.file)!r}"
    )
    print(f"{args.file}: valid {csv_format} submission, {len(frame)} rows, {len(images)} images")
    for name, rate in positive_rates(frame, csv_format, classes).items():
        print(f"positive rate {name}: {rate:.4f}")


def _run_score(args: argparse.Namespace) -> None:
    """``score``: Kaggle Dice of FILE against TRUTH; print per class and overall."""
    frame = read_submission(args.file)
    csv_format = _detect(frame, args.file)
    truth = read_submission(args.truth)
    images, classes = _keys_of(truth, csv_format, f"truth {str(args.truth)!r}")
    if csv_format == "instances":
        classes = ["object"]
    shapes = _cli_shapes(args, images)
    result = score_submission(
        frame,
        truth,
        csv_format,
        classes,
        shapes,
        f"submission {str(args.file)!r}",
        f"truth {str(args.truth)!r}",
    )
    for name, value in result["per_class"].items():
        print(f"kaggle dice {name}: {value:.6f}")
    print(f"kaggle dice overall: {result['overall']:.6f} ({result['n_images']} images)")


def _detect(frame: pd.DataFrame, path: Path) -> str:
    """The CSV format named by a file's header."""
    try:
        return detect_csv_format([str(column) for column in frame.columns])
    except ValueError as error:
        raise SubmissionError(f"submission {str(path)!r} row 1 (header): {error}") from None


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a submission file")
    check.add_argument("file", type=Path)
    check.add_argument("--sample", type=Path, required=True, help="sample_submission.csv")
    check.add_argument("--classes", help="comma-separated class names (default: the sample's)")
    score = commands.add_parser("score", help="Kaggle Dice of a submission against a truth file")
    score.add_argument("file", type=Path)
    score.add_argument("--truth", type=Path, required=True, help="truth CSV, same CSV format")
    for sub in (check, score):
        sub.add_argument("--shape", type=parse_size, help="fixed mask size HxW, e.g. 350x525")
        sub.add_argument("--images", type=Path, help="image folder: masks at each image's size")
        sub.add_argument("--verbose", action="store_true")


def _run(args: argparse.Namespace) -> int:
    """0 the submission is valid (and scored); SubmissionError (exit 1) names the row."""
    if (args.shape is None) == (args.images is None):
        raise ValueError(
            "give exactly one of --shape HxW (a fixed submission size) or --images DIR "
            "(each image's own size): RLE runs cannot be checked against the image "
            "bounds without the mask size, which no CSV format records"
        )
    (_run_check if args.command == "check" else _run_score)(args)
    return 0


COMMAND = Command(
    stage="submission",
    description=__doc__,
    add_arguments=_add_arguments,
    run=_run,
    examples=(
        "check submissions/FILE.csv --sample data/demo/sample_submission.csv --shape 80x120",
        "score submissions/FILE.csv --truth data/demo/test_truth.csv --shape 80x120",
    ),
    uses_config=False,
    failed=(SubmissionError,),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
