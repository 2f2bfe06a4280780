"""``python -m pipeline.demo``: the whole pipeline on the embedded demo data.

Stages run in order, each skipping work already done (idempotent): demo data, the
split, every segmentation fold. Prints the out-of-fold score at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline import make_demo_data
from pipeline.cli import add_config_arguments, config_from_args, setup_logging
from pipeline.config import Config
from pipeline.train import train_folds

log = logging.getLogger(__name__)


def run_demo(config: Config) -> dict[str, float]:
    """Generate the demo data if needed, then run every implemented stage; return figures."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    height, width = config.data.submission_size
    out = Path(config.data.train_csv).parent
    make_demo_data.main(["--out", str(out), "--truth-size", f"{height}x{width}"])
    timings["data_s"] = time.monotonic() - started
    started = time.monotonic()
    results = train_folds(config, list(range(config.folds.n_splits)), resume=True)
    timings["train_s"] = time.monotonic() - started
    oof = float(np.mean([r["oof_kaggle_dice_050"] for r in results]))
    print(f"segmentation OOF Kaggle Dice at 0.5, mean of {len(results)} folds: {oof:.4f}")
    print(f"run directory: {config.run_dir}")
    print(
        "stages still to come in this demo: classifier, tuning, prediction and submission, "
        "evaluation report"
    )
    return {"oof_kaggle_dice_050": oof, **timings}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    figures = run_demo(config_from_args(args))
    print("timings: " + ", ".join(f"{k}={v:.0f}s" for k, v in figures.items() if k.endswith("_s")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
