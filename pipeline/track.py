"""``python -m pipeline.track``: upload what a run has on disk to MLflow, after the fact.

With ``tracking.backend: mlflow`` every stage logs as it goes; this command logs what a
run directory holds (the config, every fold's per-epoch history and summary, the tuned
and nested CV, predict's timings and test score, the report and its energy estimate),
for a run trained while the store could not be reached, or before tracking was turned
on. Logging twice adds nothing: a fold continues its own run and epochs already logged
are skipped. The store is the config's ``tracking.uri`` (default
``sqlite:///<runs_dir>/mlflow.db``); tracking is on for this command whatever
``tracking.backend`` says.

Without RUN_DIR it uploads the config's experiment; with RUN_DIRs it imports those run
directories (each read with the config its folds were trained with), e.g. every
experiment of a grid: ``foldseg track --config configs/demo.yaml runs/grid_*/*``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.core.config import Config, read_run_config
from pipeline.core.layout import CLASSIFIER_STAGE, TRAINED_CONFIG, fold_dir
from pipeline.run.command import Command, config_from_args
from pipeline.run.tracking import record_run, tracked, tracking_uri

log = logging.getLogger(__name__)


def track_run(config: Config) -> str | None:
    """Upload the experiment of ``config`` (tracking forced on); returns its MLflow run
    id, None when the store could not be used (a warning says why)."""
    config = config.with_overrides(["tracking.backend=mlflow"])
    with tracked(config) as tracker:
        record_run(tracker, config)
        return tracker.run_id


def run_dir_config(run_dir: Path, config: Config) -> Config:
    """The config of an existing run directory: the one its first recorded fold was
    trained with, placed at ``run_dir`` and given ``config``'s tracking section.

    Raises:
        FileNotFoundError: ``run_dir`` has no trained fold's config.
    """
    run_dir = Path(run_dir)
    candidates = [
        fold_dir(run_dir, k, stage) / TRAINED_CONFIG
        for stage in ("", CLASSIFIER_STAGE)
        for k in range(64)
    ]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"{run_dir} is not a run directory: no fold_<K>/{TRAINED_CONFIG} in it"
        )
    saved = read_run_config(found)
    tracking = config.tracking
    return saved.with_overrides(
        [
            f"runs_dir={run_dir.resolve().parent}",
            f"experiment={run_dir.name}",
            f"tracking.uri={tracking.uri or tracking_uri(config)}",
            f"tracking.experiment={tracking.experiment}",
        ]
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs",
        nargs="*",
        type=Path,
        metavar="RUN_DIR",
        help="existing run directories to import (default: the config's experiment)",
    )


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    configs = [run_dir_config(path, config) for path in args.run_dirs] or [config]
    failed = 0
    for one in configs:
        run_id = track_run(one)
        if run_id is None:
            failed += 1
            continue
        print(f"{one.run_dir}: MLflow run {run_id} in {tracking_uri(one)}")
    return 1 if failed else 0


COMMAND = Command(
    stage="track",
    description=__doc__,
    add_arguments=_add_arguments,
    run=_run,
    examples=(
        "--config configs/demo.yaml",
        "--config configs/demo.yaml runs/grid_demo/*",
    ),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
