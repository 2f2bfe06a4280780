"""Pure maths of the learning-rate range test and of the seeded grid search.

Range test (Smith 2015, fastai): the learning rate grows exponentially, one value per
batch; the batch losses are smoothed with a bias-corrected exponential moving average;
the test stops once the smoothed loss exceeds ``diverge_factor`` x its running minimum
or a loss is not finite. Two suggestions are read off the smoothed curve: the steepest
descent in log-lr before the minimum, and the minimum's lr / 10.

Grid search: ``key=[a, b]`` specs are validated against the config, expanded to the
cartesian product x seeds, named, and their out-of-fold scores summarised per setting
with a paired (by seed) comparison of the two best settings.

numpy/pandas only (plus the pure config module): nothing here imports TensorFlow.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from numpy.typing import ArrayLike

from pipeline.core.config import Config
from pipeline.core.layout import LR_FIND_JSON

LR_FIND_DIR = "lr_find"

# A verdict calls a difference real when it exceeds this many standard errors.
VERDICT_STANDARD_ERRORS = 2.0

# Keys the grid sets itself: the run's name, where it lives and its seed.
GRID_RESERVED_KEYS = ("experiment", "runs_dir", "seed")


# --------------------------------------------------------------------------------------
# Learning-rate range test
# --------------------------------------------------------------------------------------


def exponential_lrs(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """float64 (steps,): ``start_lr`` to ``end_lr`` inclusive, evenly spaced in log-lr."""
    if not 0 < start_lr < end_lr:
        raise ValueError(
            f"lr_find.start_lr and lr_find.end_lr must satisfy 0 < start_lr < end_lr; "
            f"got {start_lr} and {end_lr}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"lr_find.steps must be an integer >= 2; got {steps!r}")
    return np.geomspace(start_lr, end_lr, steps)


def _check_smoothing(smoothing: float) -> None:
    if not 0 <= smoothing < 1:
        raise ValueError(f"lr_find.smoothing must be in [0, 1); got {smoothing}")


def smooth_losses(losses: ArrayLike, smoothing: float) -> np.ndarray:
    """Bias-corrected exponential moving average of ``losses``: float64 (N,).

    ``smoothed[t] = sum_k smoothing**k * loss[t-k] / sum_k smoothing**k`` (k = 0..t),
    i.e. the fastai EMA divided by ``1 - smoothing**(t+1)``, so a constant series stays
    constant from the first value on. ``smoothing = 0`` returns the losses unchanged.
    """
    _check_smoothing(smoothing)
    values = np.asarray(losses, dtype=np.float64)
    if values.size == 0:
        return values
    # pandas' adjusted EWM is exactly the bias-corrected EMA, without a Python loop.
    return pd.Series(values).ewm(alpha=1.0 - smoothing, adjust=True).mean().to_numpy()


def find_divergence(losses: ArrayLike, smoothing: float, diverge_factor: float) -> int | None:
    """Index of the first batch where the range test must stop, or None.

    Stops at the first non-finite loss, or where the smoothed loss exceeds
    ``diverge_factor`` x its minimum so far (losses are assumed positive).
    """
    if diverge_factor <= 1:
        raise ValueError(f"lr_find.diverge_factor must be > 1; got {diverge_factor}")
    raw = np.asarray(losses, dtype=np.float64)
    bad = ~np.isfinite(raw)
    n_finite = int(np.argmax(bad)) if bad.any() else raw.size
    smoothed = smooth_losses(raw[:n_finite], smoothing)
    over = smoothed > diverge_factor * np.minimum.accumulate(smoothed)
    if over.any():
        return int(np.argmax(over))
    return n_finite if n_finite < raw.size else None


@dataclass(frozen=True)
class LrSuggestion:
    """What a range test suggests; indices refer to the recorded (lr, loss) rows."""

    suggested_lr: float
    rule: str
    min_over_10_lr: float
    min_loss_lr: float
    min_index: int
    steep_lr: float | None
    steep_index: int | None
    minimum_inside_range: bool

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``lr_find.json``)."""
        return {
            "suggested_lr": self.suggested_lr,
            "rule": self.rule,
            "min_over_10_lr": self.min_over_10_lr,
            "min_loss_lr": self.min_loss_lr,
            "min_index": self.min_index,
            "steep_lr": self.steep_lr,
            "steep_index": self.steep_index,
            "minimum_inside_range": self.minimum_inside_range,
        }


RULE_MIN_OVER_10 = "minimum/10"
RULE_STEEPEST = "steepest"


def suggest_lr(
    lrs: ArrayLike,
    losses: ArrayLike,
    smoothing: float,
    stopped_early: bool,
    skip_start: int | None = None,
) -> LrSuggestion:
    """Read the suggestions off a recorded range test.

    Args:
        lrs: float (N,) increasing learning rates, one per recorded batch.
        losses: float (N,) batch losses; rows from the first non-finite one are ignored.
        smoothing: the EMA factor of ``smooth_losses``.
        stopped_early: whether the test stopped on divergence (then the minimum of the
            smoothed loss is inside the range even when it is the last finite row).
            Otherwise the minimum counts as inside only when at least ``max(1, N // 20)``
            rows follow it: a moving average that lags a flat end of the curve keeps
            creeping down and puts its minimum on the last rows.
        skip_start: rows ignored by the steepest-slope search, whose first smoothed
            values rest on few batches and whose slopes are mostly noise; default
            ``max(1, N // 10)`` (fastai skips 10 of 100).

    Returns:
        ``steep_lr``: lr of the most negative slope d(smoothed)/d(log lr), searched from
        ``skip_start`` up to the smoothed minimum (None when it never descends there).
        ``min_over_10_lr``: lr of the smoothed minimum / 10. ``suggested_lr`` is the
        smaller of the two; the steepest point alone when the loss was still falling at
        the end of the range (no minimum to divide), minimum/10 alone when the loss
        never descends before its minimum. Why the smaller: both estimate "a high lr at
        which the loss still falls fast", and each errs high in a known way. The
        moving average lags the raw losses by about ``smoothing / (1 - smoothing)``
        batches, which moves its steepest point to higher lrs (about half a decade at
        smoothing 0.98, 200 steps over 7 decades, on a synthetic curve); minimum/10
        errs high when the valley is wide and flat (the demo: a valley from 1e-2 to
        1e-1, minimum/10 = 1e-2 trained worse than 2e-3). Erring low is guarded by
        ``skip_start``.
    """
    lr = np.asarray(lrs, dtype=np.float64)
    raw = np.asarray(losses, dtype=np.float64)
    if lr.shape != raw.shape or lr.ndim != 1:
        raise ValueError(
            f"lrs and losses must be 1-D of one length; got {lr.shape} and {raw.shape}"
        )
    bad = ~np.isfinite(raw)
    n = int(np.argmax(bad)) if bad.any() else raw.size
    if n < 2:
        raise ValueError(
            f"the range test recorded {n} finite loss(es) before diverging; need at least 2 "
            f"(lower lr_find.start_lr or check the data)"
        )
    lr, smoothed = lr[:n], smooth_losses(raw[:n], smoothing)
    if np.any(lr <= 0) or np.any(np.diff(lr) <= 0):
        raise ValueError("lrs must be positive and strictly increasing")
    min_index = int(np.argmin(smoothed))
    skip = max(1, n // 10) if skip_start is None else int(skip_start)
    slope = np.gradient(smoothed, np.log(lr))
    steep_index: int | None = None
    if min_index > skip:
        candidate = skip + int(np.argmin(slope[skip : min_index + 1]))
        if slope[candidate] < 0:
            steep_index = candidate
    inside = stopped_early or min_index < n - 1 - max(1, n // 20)
    min_over_10 = float(lr[min_index] / 10)
    steep_lr = float(lr[steep_index]) if steep_index is not None else None
    if steep_lr is not None and not inside:
        suggested, rule = steep_lr, f"{RULE_STEEPEST} (no minimum inside the range)"
    elif steep_lr is not None and steep_lr < min_over_10:
        suggested, rule = steep_lr, f"{RULE_STEEPEST} (below minimum/10)"
    elif steep_lr is not None:
        suggested, rule = min_over_10, f"{RULE_MIN_OVER_10} (below the steepest point)"
    else:
        suggested, rule = min_over_10, f"{RULE_MIN_OVER_10} (no descent before the minimum)"
    return LrSuggestion(
        suggested_lr=suggested,
        rule=rule,
        min_over_10_lr=min_over_10,
        min_loss_lr=float(lr[min_index]),
        min_index=min_index,
        steep_lr=steep_lr,
        steep_index=steep_index,
        minimum_inside_range=inside,
    )


def ema_lag_decades(smoothing: float, start_lr: float, end_lr: float, steps: int) -> float:
    """How far (in decades of lr) the smoothed loss trails the raw losses.

    The EMA's mean lag is ``smoothing / (1 - smoothing)`` batches; each batch moves the
    lr by ``log10(end_lr / start_lr) / (steps - 1)`` decades.
    """
    _check_smoothing(smoothing)
    lag_steps = smoothing / (1 - smoothing)
    return lag_steps * math.log10(end_lr / start_lr) / (steps - 1)


def range_test_frame(lrs: ArrayLike, losses: ArrayLike, smoothing: float) -> pd.DataFrame:
    """The recorded test as a table: ``lr``, ``loss``, ``smoothed`` (float64, N rows).

    ``smoothed`` is NaN from the first non-finite loss on.
    """
    raw = np.asarray(losses, dtype=np.float64)
    bad = ~np.isfinite(raw)
    n = int(np.argmax(bad)) if bad.any() else raw.size
    smoothed = np.full(raw.size, np.nan)
    smoothed[:n] = smooth_losses(raw[:n], smoothing)
    return pd.DataFrame(
        {"lr": np.asarray(lrs, dtype=np.float64), "loss": raw, "smoothed": smoothed}
    )


def lr_find_path(config: Config) -> Path:
    """``runs/<experiment>/lr_find/lr_find.json``."""
    return config.run_dir / LR_FIND_DIR / LR_FIND_JSON


def resolve_lr(config: Config) -> float:
    """``train.lr`` as a float; for ``auto``, the LR finder's ``suggested_lr``.

    FileNotFoundError when ``auto`` is asked for before the LR finder ran.
    """
    lr = config.train.lr
    if lr != "auto":
        return float(lr)
    path = lr_find_path(config)
    if not path.is_file():
        source = config.source or "<config>"
        raise FileNotFoundError(
            f"train.lr is auto but {path} does not exist; run "
            f"`python -m pipeline.lr_find --config {source}` first (with the same --set "
            f"overrides)"
        )
    try:
        value = json.loads(path.read_text()).get("suggested_lr")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}); run lr_find again") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{path}: suggested_lr must be a positive number; got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------
# Grid search: specs, expansion, names
# --------------------------------------------------------------------------------------


def config_value(config: Config, key: str) -> Any:
    """The value of dotted ``key`` in ``config`` (KeyError naming it when unknown)."""
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node.to_dict() if hasattr(node, "to_dict") else node


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


def make_results_table(
    runs: Sequence[GridRun],
    scores: Mapping[str, Mapping[int, float]],
    folds: Sequence[int],
    status: Mapping[str, str],
) -> pd.DataFrame:
    """One row per experiment: ``experiment``, ``setting``, each grid key, ``seed``,
    ``status``, ``fold_<k>`` (its OOF score, NaN if missing) and ``cv_mean`` (mean over
    ``folds``; NaN unless every one of them finished)."""
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
        rows.append(row)
    return pd.DataFrame(rows)


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
        rows.append(row)
    summary = pd.DataFrame(rows)
    return summary.sort_values("mean_cv", ascending=False, na_position="last", kind="stable")


@dataclass(frozen=True)
class PairedVerdict:
    """The best setting against the runner-up, paired by seed (same split per seed)."""

    best: str
    runner_up: str
    difference: float
    standard_error: float
    n_pairs: int
    verdict: str

    def describe(self) -> str:
        """A few lines for the console."""
        head = f"best: {self.best}\nrunner-up: {self.runner_up}\n"
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

    For each seed where both settings completed, ``d = cv_best - cv_runner_up``; the
    verdict is "likely real" when ``|mean d| > 2 x std(d) / sqrt(n)``, "within noise"
    otherwise, and "cannot judge" with fewer than two such seeds.
    """
    if len(summary) < 2:
        return None
    best, runner_up = summary["setting"].iloc[0], summary["setting"].iloc[1]
    by_seed = results.pivot_table(index="seed", columns="setting", values="cv_mean")
    if best not in by_seed or runner_up not in by_seed:
        diffs = np.array([])
    else:
        diffs = (by_seed[best] - by_seed[runner_up]).dropna().to_numpy()
    n = int(diffs.size)
    mean = float(diffs.mean()) if n else float("nan")
    if n < 2:
        verdict = "cannot judge: needs at least 2 seeds finished for both (use --seeds 2 or more)"
        return PairedVerdict(best, runner_up, mean, float("nan"), n, verdict)
    se = float(diffs.std(ddof=1) / np.sqrt(n))
    real = abs(mean) > VERDICT_STANDARD_ERRORS * se if se > 0 else mean != 0
    if real:
        verdict = f"likely real (more than {VERDICT_STANDARD_ERRORS:g} standard errors)"
    else:
        verdict = f"within noise (not more than {VERDICT_STANDARD_ERRORS:g} standard errors)"
    return PairedVerdict(best, runner_up, mean, se, n, verdict)
