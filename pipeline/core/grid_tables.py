"""Pure maths of the seeded grid search: run specs and result tables.

``key=[a, b]`` specs are validated against the config, expanded to the cartesian
product x seeds and named; their out-of-fold scores are laid out one row per run,
summarised per setting, and the two best settings compared paired by seed.

numpy/pandas only (plus the pure config module): nothing here imports TensorFlow.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline.core.config import Config

# A verdict calls a difference real when it exceeds this many standard errors.
VERDICT_STANDARD_ERRORS = 2.0

# Keys the grid sets itself: the run's name, where it lives and its seed.
GRID_RESERVED_KEYS = ("experiment", "runs_dir", "seed")


# --------------------------------------------------------------------------------------
# Grid search: specs, expansion, names
# --------------------------------------------------------------------------------------


def config_value(config: Config, key: str) -> Any:
    """The value of dotted ``key`` in ``config`` (KeyError naming it when unknown)."""
    node: Any = config.to_dict()
    for part in key.split("."):
        node = node[part]
    return node


def parse_grid_spec(text: str, config: Config) -> tuple[str, list[Any]]:
    """``"train.lr=[1e-3, 3e-4]"`` -> ``("train.lr", [0.001, 0.0003])``.

    The values are a YAML list; each one is applied to ``config`` as a ``--set``
    override, so an unknown key or a wrong type is the config's own ``ConfigError``,
    and the values come back as the config stores them (``1e-3`` -> ``0.001``).
    """
    if "=" not in text:
        raise ValueError(f"--grid must look like key.path=[v1, v2]; got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    if key in GRID_RESERVED_KEYS:
        raise ValueError(
            f"--grid may not vary {key!r}: the grid sets {list(GRID_RESERVED_KEYS)} itself "
            f"(use --seeds for seeds); got {text!r}"
        )
    try:
        values = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"--grid {text!r}: the values are not valid YAML: {exc}") from exc
    if not isinstance(values, list) or not values:
        raise ValueError(
            f"--grid {key}: the values must be a non-empty YAML list like {key}=[a, b]; got {raw!r}"
        )
    normalised = [config_value(config.with_overrides([override(key, v)]), key) for v in values]
    labels = [format_value(v) for v in normalised]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"--grid {key}: values repeat after parsing: {duplicates}")
    return key, normalised


def override(key: str, value: Any) -> str:
    """A ``--set`` item for ``value`` (JSON is YAML, so it reads back as the same value)."""
    return f"{key}={json.dumps(value)}"


def format_value(value: Any) -> str:
    """A short, exact label: ``0.001``, ``32x32``, ``null``, ``true``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "x".join(format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    return str(value)


def sanitise_name(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._=+-]`` replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")


def experiment_name(base: str, settings: Mapping[str, Any], seed: int) -> str:
    """``<base>__<key>=<value>__...__seed=<seed>``, safe as a directory name."""
    parts = [base, *(f"{k}={format_value(v)}" for k, v in settings.items()), f"seed={seed}"]
    return "__".join(sanitise_name(p) for p in parts)


def setting_label(settings: Mapping[str, Any]) -> str:
    """``"train.lr=0.001, train.batch_size=8"``; ``"(base config)"`` when empty."""
    if not settings:
        return "(base config)"
    return ", ".join(f"{k}={format_value(v)}" for k, v in settings.items())


@dataclass(frozen=True)
class GridRun:
    """One experiment of a grid: a setting (key -> value) and a seed."""

    name: str
    settings: dict[str, Any]
    seed: int

    @property
    def label(self) -> str:
        """The setting without the seed, e.g. ``train.lr=0.001, train.batch_size=8``."""
        return setting_label(self.settings)

    def overrides(self) -> list[str]:
        """``--set`` items that turn the base config into this experiment."""
        items = [override(k, v) for k, v in self.settings.items()]
        return [*items, override("seed", self.seed), override("experiment", self.name)]


def grid_seeds(base_seed: int, n_seeds: int) -> list[int]:
    """``base_seed + i`` for ``i < n_seeds``."""
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1; got {n_seeds!r}")
    return [base_seed + i for i in range(n_seeds)]


def expand_grid(
    base: str, grid: Sequence[tuple[str, Sequence[Any]]], seeds: Sequence[int]
) -> list[GridRun]:
    """Every combination of the grid's values (cartesian product, in the order given)
    x every seed, seeds innermost. An empty grid gives the base config x seeds."""
    keys = [key for key, _ in grid]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"--grid names a key more than once: {repeated}")
    runs: list[GridRun] = []
    for combination in itertools.product(*(values for _, values in grid)):
        settings = dict(zip(keys, combination, strict=True))
        runs.extend(GridRun(experiment_name(base, settings, s), settings, s) for s in seeds)
    names = [r.name for r in runs]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"grid values give the same experiment name after sanitising: {clashes}")
    return runs


def parse_folds(text: str | None, n_splits: int) -> list[int]:
    """``"0,2"`` -> ``[0, 2]``; None or ``"all"`` -> every fold."""
    if text is None or text.strip() == "all":
        return list(range(n_splits))
    try:
        folds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(
            f"--folds must be comma-separated integers like 0,1; got {text!r}"
        ) from exc
    bad = [f for f in folds if not 0 <= f < n_splits]
    if not folds or bad:
        raise ValueError(f"--folds must name folds in [0, {n_splits - 1}]; got {text!r}")
    if len(set(folds)) != len(folds):
        raise ValueError(f"--folds names a fold twice; got {text!r}")
    return folds


# --------------------------------------------------------------------------------------
# Grid search: result tables
# --------------------------------------------------------------------------------------


def fold_column(fold: int) -> str:
    """The results table's column of fold ``fold``'s score: ``fold_<k>``."""
    return f"fold_{fold}"


# With --tune: each run's tuned scores from its postprocess.json (``extra.scores``).
NESTED = "nested_cv"  # tuned on the other folds, scored on each (the honest figure)
IN_SAMPLE = "tuned_cv_in_sample"  # tuned and scored on the same OOF (optimistic)
TUNED_SCORES = {NESTED: "tuned_nested", IN_SAMPLE: "tuned"}


def make_results_table(
    runs: Sequence[GridRun],
    scores: Mapping[str, Mapping[int, float]],
    folds: Sequence[int],
    status: Mapping[str, str],
    tuned: Mapping[str, Mapping[str, float]] | None = None,
) -> pd.DataFrame:
    """One row per experiment: ``experiment``, ``setting``, each grid key, ``seed``,
    ``status``, ``fold_<k>`` (its OOF score, NaN if missing) and ``cv_mean`` (mean over
    ``folds``; NaN unless every one of them finished). With ``tuned`` (run name -> its
    postprocess.json scores), also ``nested_cv`` and ``tuned_cv_in_sample`` (NaN where
    the run was not tuned)."""
    rows = []
    for run in runs:
        fold_scores = scores.get(run.name, {})
        row: dict[str, Any] = {"experiment": run.name, "setting": run.label}
        row.update({k: format_value(v) for k, v in run.settings.items()})
        row["seed"] = run.seed
        row["status"] = status.get(run.name, "")
        values = [float(fold_scores.get(f, np.nan)) for f in folds]
        row.update({fold_column(f): v for f, v in zip(folds, values, strict=True)})
        row["cv_mean"] = float(np.mean(values)) if np.all(np.isfinite(values)) else np.nan
        if tuned is not None:
            got = tuned.get(run.name, {})
            for column, key in TUNED_SCORES.items():
                row[column] = float(got[key]) if key in got else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def ranking(results: pd.DataFrame) -> tuple[str, str]:
    """(per-run column, summary column) the grid ranks and pairs by: the nested tuned
    CV when the runs were tuned, else the OOF score at 0.5."""
    return (NESTED, "mean_nested") if NESTED in results.columns else ("cv_mean", "mean_cv")


def _fold_matrix(results: pd.DataFrame) -> np.ndarray:
    columns = [c for c in results.columns if re.fullmatch(r"fold_\d+", c)]
    return results[columns].to_numpy(dtype=np.float64)


def _pooled_std(matrix: np.ndarray) -> float:
    """Within-run standard deviation across folds, pooled over runs (ddof 1 each)."""
    counts = np.isfinite(matrix).sum(axis=1)
    usable = counts >= 2
    if not usable.any():
        return float("nan")
    rows = matrix[usable]
    sum_squares = np.nansum((rows - np.nanmean(rows, axis=1, keepdims=True)) ** 2)
    return float(np.sqrt(sum_squares / (counts[usable] - 1).sum()))


def summarise_grid(results: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per setting, best first (by ``mean_cv``, NaN last).

    Columns: ``setting``, each grid key, ``mean_cv`` (mean over seeds of the complete
    runs' CV means), ``mean_all`` (mean of every finished fold of every run),
    ``std_folds`` (across folds within a run, pooled), ``std_seeds`` (of the CV means
    across seeds, ddof 1), ``n_runs`` (complete runs), ``n_folds`` (finished folds).
    Tuned runs add ``mean_nested``, ``std_seeds_nested`` and ``mean_tuned_in_sample``,
    and the order is by ``mean_nested``.
    """
    rows = []
    for label, group in results.groupby("setting", sort=False):
        complete = group["cv_mean"].dropna()
        matrix = _fold_matrix(group)
        row: dict[str, Any] = {"setting": label}
        row.update({k: group[k].iloc[0] for k in keys})
        row["mean_cv"] = float(complete.mean()) if len(complete) else np.nan
        row["mean_all"] = float(np.nanmean(matrix)) if np.isfinite(matrix).any() else np.nan
        row["std_folds"] = _pooled_std(matrix)
        row["std_seeds"] = float(complete.std(ddof=1)) if len(complete) >= 2 else np.nan
        row["n_runs"] = len(complete)
        row["n_folds"] = int(np.isfinite(matrix).sum())
        if NESTED in group:
            nested = group[NESTED].dropna()
            row["mean_nested"] = float(nested.mean()) if len(nested) else np.nan
            row["std_seeds_nested"] = float(nested.std(ddof=1)) if len(nested) >= 2 else np.nan
            in_sample = group[IN_SAMPLE].dropna()
            row["mean_tuned_in_sample"] = float(in_sample.mean()) if len(in_sample) else np.nan
        rows.append(row)
    summary = pd.DataFrame(rows)
    order = ranking(results)[1]
    return summary.sort_values(order, ascending=False, na_position="last", kind="stable")


@dataclass(frozen=True)
class PairedVerdict:
    """The best setting against the runner-up, paired by seed (same split per seed)."""

    best: str
    runner_up: str
    difference: float
    standard_error: float
    n_pairs: int
    verdict: str
    measure: str = "OOF Kaggle Dice at 0.5"

    def describe(self) -> str:
        """A few lines for the console."""
        head = f"best: {self.best}\nrunner-up: {self.runner_up}\ncompared on: {self.measure}\n"
        if self.n_pairs == 0:
            return head + self.verdict
        if self.n_pairs == 1:
            return head + f"difference {self.difference:+.4f} on one seed: {self.verdict}"
        return head + (
            f"difference {self.difference:+.4f} +/- {self.standard_error:.4f} (standard error "
            f"over {self.n_pairs} seeds, paired): {self.verdict}"
        )


def compare_top_two(results: pd.DataFrame, summary: pd.DataFrame) -> PairedVerdict | None:
    """Paired comparison of the summary's first two settings; None with fewer than two.

    For each seed where both settings completed, ``d = cv_best - cv_runner_up`` (the
    nested tuned CV when the runs were tuned); the verdict is "likely real" when
    ``|mean d| > 2 x std(d) / sqrt(n)``, "within noise" otherwise, and "cannot judge"
    with fewer than two such seeds.
    """
    if len(summary) < 2:
        return None
    column = ranking(results)[0]
    measure = "nested tuned CV" if column == NESTED else "OOF Kaggle Dice at 0.5"
    best, runner_up = summary["setting"].iloc[0], summary["setting"].iloc[1]
    by_seed = results.pivot_table(index="seed", columns="setting", values=column)
    if best not in by_seed or runner_up not in by_seed:
        diffs = np.array([])
    else:
        diffs = (by_seed[best] - by_seed[runner_up]).dropna().to_numpy()
    n = int(diffs.size)
    mean = float(diffs.mean()) if n else float("nan")
    if n < 2:
        verdict = "cannot judge: needs at least 2 seeds finished for both (use --seeds 2 or more)"
        return PairedVerdict(best, runner_up, mean, float("nan"), n, verdict, measure)
    se = float(diffs.std(ddof=1) / np.sqrt(n))
    real = abs(mean) > VERDICT_STANDARD_ERRORS * se if se > 0 else mean != 0
    if real:
        verdict = f"likely real (more than {VERDICT_STANDARD_ERRORS:g} standard errors)"
    else:
        verdict = f"within noise (not more than {VERDICT_STANDARD_ERRORS:g} standard errors)"
    return PairedVerdict(best, runner_up, mean, se, n, verdict, measure)
