"""Convert training masks between a Kaggle RLE CSV and a folder of mask images.

The source is the config's data (``data.train_csv`` or ``data.masks`` over
``data.train_images``), read exactly as training reads it, or the same given by
``--images`` with ``--csv`` or ``--masks``. The target is a CSV (``--to-csv F``, in
``--csv-format``) or a mask folder (``--to-masks DIR``, in ``--mask-format``: binary for
one class, per_class otherwise, or indexed/palette when the classes never overlap).
Everything is checked before anything is written; the CSV is written atomically and
the folder built under a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from pipeline.core.atomic import publish_directory, write_csv
from pipeline.core.config import Config
from pipeline.core.formats import CSV_FORMATS, to_kaggle_frame
from pipeline.core.images import read_image_size, resolve_image_path
from pipeline.core.mask_folder import MASK_FORMATS, write_mask_folder
from pipeline.run.command import Command, config_from_args
from pipeline.run.experiment import (
    dataset_image_ids,
    mask_options,
    mask_source,
    read_training_masks,
    submission_csv_format,
)

log = logging.getLogger(__name__)


def source_overrides(args: argparse.Namespace) -> list[str]:
    """``--images``/``--csv``/``--masks`` as config overrides (after ``--set``)."""
    overrides = list(args.overrides)
    if args.images is not None:
        overrides.append(f"data.train_images={args.images}")
    if args.csv is not None:
        overrides += [f"data.train_csv={args.csv}", "data.masks=null"]
    if args.masks is not None:
        overrides += [f"data.masks={args.masks}", "data.train_csv=null"]
    return overrides


def convert_masks(
    config: Config,
    to_csv: Path | None = None,
    to_masks: Path | None = None,
    csv_format: str | None = None,
    mask_format: str | None = None,
) -> str:
    """Read the config's training masks and write them as a CSV or a mask folder.

    Args:
        config: names the source (``data.train_csv`` or ``data.masks``, the images).
        to_csv: the CSV to write (exactly one of ``to_csv`` and ``to_masks``).
        to_masks: the mask folder to make; it must not exist, or be empty.
        csv_format: the CSV's format; None: ``data.csv_format``, or the source's.
        mask_format: the folder's format; None: ``data.mask_format`` unless auto, else
            binary for one class and per_class for several.

    Returns:
        A line saying what was written.

    Raises:
        ValueError, FileNotFoundError, FileExistsError: bad input, before any write.
    """
    if (to_csv is None) == (to_masks is None):
        raise ValueError("give exactly one of --to-csv and --to-masks")
    if to_masks is not None and to_masks.exists() and any(to_masks.iterdir()):
        raise FileExistsError(f"--to-masks folder {str(to_masks)!r} exists and is not empty")
    if to_csv is not None and to_csv.is_dir():
        raise FileExistsError(f"--to-csv {str(to_csv)!r} is a folder")
    image_ids = dataset_image_ids(config)
    table, _void = read_training_masks(config, image_ids)
    source = mask_source(config)
    if to_csv is not None:
        chosen = csv_format or submission_csv_format(config)
        frame = to_kaggle_frame(table.table, chosen, table.classes)
        write_csv(to_csv, frame)
        return (
            f"{to_csv}: {len(image_ids)} images x {len(table.classes)} classes from {source}, "
            f"CSV format {chosen}"
        )
    assert to_masks is not None
    data = config.data
    if mask_format is None:
        mask_format = data.mask_format if data.mask_format != "auto" else None
    if mask_format is None:
        mask_format = "binary" if len(table.classes) == 1 else "per_class"
    folder = Path(data.train_images)
    sizes = {i: read_image_size(resolve_image_path(folder, i)) for i in image_ids}
    to_masks.parent.mkdir(parents=True, exist_ok=True)
    built = to_masks.with_name(f".{to_masks.name}.tmp-{os.getpid()}")
    shutil.rmtree(built, ignore_errors=True)
    built.mkdir()
    try:
        written = write_mask_folder(
            table.table, table.classes, sizes, built, mask_format, mask_options(config)
        )
        if to_masks.exists():
            to_masks.rmdir()  # empty, checked above
        publish_directory(built, to_masks)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return (
        f"{to_masks}: {len(written)} {mask_format} mask files for {len(image_ids)} images x "
        f"{len(table.classes)} classes from {source}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--csv", help="read this mask CSV (sets data.train_csv)")
    source.add_argument("--masks", help="read this mask folder (sets data.masks)")
    parser.add_argument("--images", help="the training image folder (sets data.train_images)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-csv", type=Path, help="write the masks as this Kaggle CSV")
    target.add_argument("--to-masks", type=Path, help="write the masks as this new folder")
    parser.add_argument(
        "--csv-format", choices=CSV_FORMATS, help="the CSV's format (default: the source's)"
    )
    parser.add_argument(
        "--mask-format",
        choices=MASK_FORMATS,
        help="the folder's format (default: binary for one class, per_class for several)",
    )


def run(args: argparse.Namespace) -> int:
    args.overrides = source_overrides(args)
    config = config_from_args(args)
    print(convert_masks(config, args.to_csv, args.to_masks, args.csv_format, args.mask_format))
    return 0


COMMAND = Command(
    stage="convert",
    description=__doc__,
    add_arguments=add_arguments,
    run=run,
    examples=(
        "--config configs/dsb2018.yaml --to-masks data/dsb2018_masks",
        "--images data/x/train_images --masks data/x/masks --to-csv data/x/train.csv",
    ),
)
main = COMMAND.main

if __name__ == "__main__":
    raise SystemExit(main())
