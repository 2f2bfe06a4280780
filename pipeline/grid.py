"""``python -m pipeline.grid``: a seeded grid search, one experiment per setting and seed.

Every combination of the ``--grid key=[a, b]`` values (cartesian product) is trained
with ``--seeds N`` seeds (``seed + i``), each as its own experiment
``<experiment>__<key>=<value>__...__seed=<s>``, by ``python -m pipeline.train`` in a
subprocess (a crash or OOM costs one run, not the grid, and no TensorFlow state leaks
between runs). Finished folds are skipped, so rerunning the same command trains only
what is missing. Writes ``runs/<experiment>__grid/``: ``results.csv`` (one row per
experiment), ``summary.csv`` (one row per setting, best first), ``grid.json`` (the
command) and ``logs/<experiment>.log`` (each run's output).

Each seed has its own split (and initialisation); every setting of one seed shares
that split, so settings are compared on identical folds and the comparison of the two
best is paired by seed. ``--tune`` also runs ``python -m pipeline.tune`` on every
finished experiment (again only when its resolved config or a fold changed since; the
scores are kept in ``tuned/<experiment>.json``) and ranks and pairs the settings by the
nested tuned CV, the honest figure of a tuned pipeline; the in-sample tuned figure is
shown beside it. A ``postprocess.*``
key is then compared as the pipeline would use it, though each of its settings trains
its own folds. This module never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.atomic import write_csv
from pipeline.core.config import Config, load_config
from pipeline.core.grid_tables import (
    IN_SAMPLE,
    NESTED,
    GridRun,
    PairedVerdict,
    compare_top_two,
    expand_grid,
    grid_seeds,
    make_results_table,
    override,
    parse_folds,
    parse_grid_spec,
    summarise_grid,
)
from pipeline.core.layout import CACHE, GRID, POSTPROCESS
from pipeline.core.layout import FOLD_METRICS as METRICS
from pipeline.core.layout import GRID_RESULTS as RESULTS
from pipeline.core.layout import GRID_SUMMARY as SUMMARY
from pipeline.core.layout import GRID_TUNED as TUNED
from pipeline.run.command import Command
from pipeline.run.json_files import write_json
from pipeline.run.tracking import link_members, tracked

log = logging.getLogger(__name__)

GRID_SUFFIX = "__grid"
SCORE = "oof_kaggle_dice_050"

SPLIT_NOTE = (
    "each seed has its own split and initialisation; all settings of one seed share that "
    "split, so settings are compared on identical folds (the top two paired by seed)"
)


@dataclass(frozen=True)
class GridOutcome:
    """What a grid run produced."""

    directory: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    verdict: PairedVerdict | None
    failed: list[str]


def grid_dir(config: Config) -> Path:
    """``<runs_dir>/<experiment>__grid``."""
    return Path(config.runs_dir) / f"{config.experiment}{GRID_SUFFIX}"


def read_fold_scores(config: Config, folds: Sequence[int]) -> dict[int, float]:
    """``{fold: oof_kaggle_dice_050}`` of the folds of ``folds`` that finished."""
    scores = {}
    for fold in folds:
        path = config.fold_dir(fold) / METRICS
        if path.is_file():
            try:
                scores[fold] = float(json.loads(path.read_text())[SCORE])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path} is damaged ({exc!r}); retrain that fold") from None
    return scores


def tuning_key(config: Config, folds: Sequence[int]) -> str:
    """What a run's tuning depends on: its whole resolved config and when each of its
    segmentation and classifier folds last finished training."""
    stamps = {
        str(path): path.stat().st_mtime_ns if path.is_file() else None
        for fold in folds
        for path in (config.fold_dir(fold) / METRICS, config.fold_dir(fold, "classifier") / METRICS)
    }
    text = json.dumps({"config": config.to_dict(), "folds": stamps}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tuned_record(directory: Path, run: GridRun) -> Path:
    """Where the grid keeps a run's tuned scores and their key."""
    return directory / TUNED / f"{run.name}.json"


def read_tuned_scores(record: Path, key: str) -> dict[str, float] | None:
    """The tuned scores of ``record`` when its key is ``key``; None when the run was not
    tuned by the grid, or was tuned before its config or one of its folds changed."""
    if not record.is_file():
        return None
    try:
        saved = json.loads(record.read_text())
        if saved["key"] != key:
            return None
        return {name: float(value) for name, value in saved["scores"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{record} is damaged ({exc!r}); delete it to tune again") from None


def postprocess_scores(config: Config) -> dict[str, float]:
    """The scalar scores of the run's ``postprocess.json`` (``extra.scores``)."""
    path = config.run_dir / POSTPROCESS
    try:
        scores = json.loads(path.read_text())["extra"]["scores"]
        return {key: float(value) for key, value in scores.items() if not isinstance(value, list)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} cannot be read after tuning ({exc!r})") from None


def tune_command(config_path: str, overrides: Sequence[str]) -> list[str]:
    """The ``pipeline.tune`` command line of one experiment."""
    command = [sys.executable, "-m", "pipeline.tune", "--config", config_path]
    for item in overrides:
        command += ["--set", item]
    return command


def train_commands(
    config_path: str, overrides: Sequence[str], missing: Sequence[int], n_splits: int
) -> list[list[str]]:
    """The ``pipeline.train`` command lines that train the ``missing`` folds."""
    head = [sys.executable, "-m", "pipeline.train", "--config", config_path]
    for item in overrides:
        head += ["--set", item]
    if len(missing) == n_splits:
        return [[*head, "--all", "--resume"]]
    return [[*head, "--fold", str(fold), "--resume"] for fold in missing]


def _shared_overrides(config: Config, keys: Sequence[str], directory: Path) -> list[str]:
    """Overrides every run gets besides its own: one image cache for the whole grid."""
    if config.data.cache_dir is not None or any(k.startswith("data.") for k in keys):
        return []
    # The cache depends on the data and image size only, not on the seed or setting.
    return [override("data.cache_dir", str(directory / CACHE))]


def _train_on_ray(
    base: Config, planned: dict[str, list[tuple[int, list[str]]]], directory: Path
) -> dict[str, str]:
    """Every ``(fold, command)`` of every planned run as a Ray task, as many at once as
    the cluster holds; return each run's status. A failed fold does not stop the others.
    Each fold's output goes to ``logs/<experiment>.fold<K>.log``."""
    from pipeline.run.executor import JobExit
    from pipeline.run.fold_jobs import make_executor, run_commands

    tasks = [
        (name, fold, command, directory / "logs" / f"{name}.fold{fold}.log")
        for name, folds in planned.items()
        for fold, command in folds
    ]
    executor = make_executor(base, base.train.parallel_folds, shared_dir=directory)
    log.info("grid on Ray: %d fold tasks, %d at a time", len(tasks), executor.slots)
    codes: dict[str, list[int | None]] = {name: [] for name in planned}

    def ended(i: int, end: JobExit, seconds: float) -> None:
        name, fold, _, log_path = tasks[i]
        codes[name].append(end.code)
        what = "done" if end.code == 0 else f"FAILED ({end.code or end.reason})"
        log.info("%s fold %d: %s; see %s", name, fold, what, log_path)

    run_commands(executor, [(command, path) for _, _, command, path in tasks], ended)
    return {
        name: "done"
        if all(code == 0 for code in got)
        else f"failed (exit {next(c for c in got if c != 0)})"
        for name, got in codes.items()
    }


def _train_run(
    run: GridRun, commands: list[list[str]], log_path: Path, position: str, what: str = ""
) -> str:
    """Run the commands of one experiment in turn; return its status."""
    started = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for command in commands:
        with log_path.open("a") as sink:
            sink.write(f"$ {' '.join(command)}\n")
            sink.flush()
            code = subprocess.call(command, stdout=sink, stderr=subprocess.STDOUT)
        if code != 0:
            log.error("%s %s: %sFAILED (exit %d); see %s", position, run.name, what, code, log_path)
            return f"{what}failed (exit {code})"
    log.info("%s %s: %sdone in %.0fs", position, run.name, what, time.monotonic() - started)
    return "done"


def run_grid(
    config_path: str,
    base_overrides: Sequence[str],
    specs: Sequence[str],
    n_seeds: int = 1,
    folds_text: str | None = None,
    dry_run: bool = False,
    tune: bool = False,
) -> GridOutcome:
    """Train every missing fold of every experiment of the grid (and with ``tune`` tune
    every experiment not tuned since); write and return tables."""
    base = load_config(config_path, base_overrides)
    grid = [parse_grid_spec(spec, base) for spec in specs]
    keys = [key for key, _ in grid]
    if any(k.startswith(("folds.", "data.")) for k in keys):
        log.warning("the grid varies folds.* or data.* keys: settings do not share a split")
    folds = parse_folds(folds_text, base.folds.n_splits)
    if tune and len(folds) < base.folds.n_splits:
        raise ValueError(
            f"--tune needs every fold (tuning reads the whole OOF); drop --folds {folds_text}"
        )
    runs = expand_grid(base.experiment, grid, grid_seeds(base.seed, n_seeds))
    directory = grid_dir(base)
    shared = _shared_overrides(base, keys, directory)
    configs = {run.name: base.with_overrides([*shared, *run.overrides()]) for run in runs}
    log.info(
        "grid: %d experiment(s) = %d setting(s) x %d seed(s), folds %s, in %s",
        len(runs),
        len(runs) // n_seeds,
        n_seeds,
        folds,
        directory,
    )
    if not dry_run:
        write_json(
            directory / GRID,
            {
                "config": config_path,
                "set": list(base_overrides),
                "grid": list(specs),
                "seeds": n_seeds,
                "folds": folds,
                "tune": tune,
                "experiments": [run.name for run in runs],
            },
        )
    status: dict[str, str] = {}
    on_ray = base.jobs.executor == "ray"
    planned: dict[str, list[tuple[int, list[str]]]] = {}
    for i, run in enumerate(runs):
        position = f"[{i + 1}/{len(runs)}]"
        config = configs[run.name]
        missing = [f for f in folds if f not in read_fold_scores(config, folds)]
        if not missing:
            log.info("%s %s: already finished (folds %s)", position, run.name, folds)
            status[run.name] = "already finished"
            continue
        overrides = [*base_overrides, *shared, *run.overrides()]
        commands = train_commands(config_path, overrides, missing, base.folds.n_splits)

        if dry_run:
            log.info("%s %s: would train folds %s", position, run.name, missing)
            status[run.name] = "planned"
            continue
        if on_ray:
            # One Ray task per fold: every grid point's folds run side by side.
            planned[run.name] = [
                (k, train_commands(config_path, overrides, [k], 0)[0]) for k in missing
            ]
            log.info("%s %s: folds %s go to Ray", position, run.name, missing)
            continue
        log_path = directory / "logs" / f"{run.name}.log"
        log.info("%s %s: training folds %s (log: %s)", position, run.name, missing, log_path)
        status[run.name] = _train_run(run, commands, log_path, position)
    if planned:
        status.update(_train_on_ray(base, planned, directory))
    scores = {run.name: read_fold_scores(configs[run.name], folds) for run in runs}
    for run in runs:
        if status[run.name] == "done" and len(scores[run.name]) < len(folds):
            status[run.name] = "incomplete"
    tuned = None
    if tune:
        overrides = [*base_overrides, *shared]
        tuned = _tune_runs(config_path, overrides, runs, configs, folds, scores, status, directory,
                           dry_run)  # fmt: skip
    results = make_results_table(runs, scores, folds, status, tuned)
    summary = summarise_grid(results, keys)
    if not dry_run:
        write_csv(directory / RESULTS, results)
        write_csv(directory / SUMMARY, summary)
        _track_grid(base, directory, [configs[run.name] for run in runs])
    failed = [name for name, s in status.items() if "failed" in s or s == "incomplete"]
    return GridOutcome(directory, results, summary, compare_top_two(results, summary), failed)


def _track_grid(base: Config, directory: Path, configs: Sequence[Config]) -> None:
    """With tracking on: the grid's own run (its tables as artifacts), its points'
    runs nested under it (``tracking.link_members``)."""
    if base.tracking.backend == "none":
        return
    where = [f"runs_dir={directory.parent}", f"experiment={directory.name}"]
    with tracked(base.with_overrides(where)) as tracker:
        link_members(tracker, "grid", configs, nest=True)
        for name in (RESULTS, SUMMARY):
            tracker.log_artifact(directory / name)


def _tune_runs(
    config_path: str,
    overrides: Sequence[str],
    runs: Sequence[GridRun],
    configs: dict[str, Config],
    folds: Sequence[int],
    scores: dict[str, dict[int, float]],
    status: dict[str, str],
    directory: Path,
    dry_run: bool,
) -> dict[str, dict[str, float]]:
    """Tune every fully trained run not tuned since its config or folds changed
    (updating its ``status`` when tuning fails); return each tuned run's scores."""
    tuned: dict[str, dict[str, float]] = {}
    for i, run in enumerate(runs):
        position = f"[{i + 1}/{len(runs)}]"
        if len(scores[run.name]) < len(folds):
            continue
        config, record = configs[run.name], tuned_record(directory, run)
        key = tuning_key(config, folds)
        got = read_tuned_scores(record, key)
        if got is None and dry_run:
            log.info("%s %s: would tune", position, run.name)
        elif got is None:
            log_path = directory / "logs" / f"{run.name}.log"
            log.info("%s %s: tuning (log: %s)", position, run.name, log_path)
            command = tune_command(config_path, [*overrides, *run.overrides()])
            outcome = _train_run(run, [command], log_path, position, "tune ")
            if outcome != "done":
                status[run.name] = outcome
                continue
            got = postprocess_scores(config)
            write_json(record, {"key": key, "scores": got})
        else:
            log.info("%s %s: already tuned", position, run.name)
        if got is not None:
            tuned[run.name] = got
    return tuned


def format_summary(summary: pd.DataFrame) -> str:
    """The summary table as fixed-width text (scores to 4 decimals)."""
    shown = summary.drop(columns=[c for c in summary.columns if c != "setting" and "." in c])

    def number(x: Any) -> str:
        return f"{x:.4f}"

    return shown.to_string(index=False, float_format=number, na_rep="-")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=[V1,V2]",
        help="a config key and the values to try, e.g. 'train.lr=[1e-3,3e-4]' (repeatable; "
        "the grid is their cartesian product)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per setting (seed + i)")
    parser.add_argument("--folds", default=None, help="folds to train, e.g. 0,1 (default: all)")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the experiments; train nothing"
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="also tune each experiment (the tune stage) and rank and pair the "
        "settings by the nested tuned CV",
    )


def _run(args: argparse.Namespace) -> int:
    outcome = run_grid(
        args.config, args.overrides, args.grid, args.seeds, args.folds, args.dry_run, args.tune
    )
    if args.dry_run:
        print("\n".join(outcome.results["experiment"]))
        return 0
    print(f"results: {outcome.directory / RESULTS}")
    print(f"summary: {outcome.directory / SUMMARY}")
    print("mean_cv: mean over seeds of each run's mean OOF Kaggle Dice (at 0.5) over its folds")
    if NESTED in outcome.results.columns:
        print(
            f"mean_nested: mean over seeds of each run's {NESTED}, its post-processing tuned "
            "on the other folds and scored on each (the honest figure, and the ranking); "
            f"mean_tuned_in_sample: of {IN_SAMPLE}, tuned and scored on the same OOF "
            "(optimistic)"
        )
    print(format_summary(outcome.summary))
    if outcome.verdict is not None:
        print(outcome.verdict.describe())
    print(f"note: {SPLIT_NOTE}")
    if outcome.failed:
        print(f"{len(outcome.failed)} experiment(s) failed or incomplete: {outcome.failed}")
        return 1
    return 0


COMMAND = Command(
    stage="grid",
    description=__doc__,
    add_arguments=_add_arguments,
    run=_run,
    examples=(
        "--config configs/demo.yaml --grid 'train.lr=[0.001,0.003]' --seeds 3",
        "--config configs/demo.yaml --grid 'train.swa_top=[0,3]' --seeds 3 --tune",
    ),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
